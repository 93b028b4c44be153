"""curves.png: the moving average against hand values; the trainer draws it (test_rundir.py)."""

import json

from tokenratio.curves import moving_average, plot_run


def test_moving_average_by_hand():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 5) == [2.0, 3.0]


def test_plot_run_draws_train_and_held_out_records(tmp_path):
    records = [
        {"step": s, "loss": 0.7 - s / 100, "reward_accuracy": 0.5, "reward_margin": 0.1}
        for s in range(1, 11)
    ]
    records.append({"step": 10, "eval_loss": 0.65, "eval_reward_accuracy": 0.6})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    png = plot_run(tmp_path / "metrics.jsonl", tmp_path / "curves.png", "dpo")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]
