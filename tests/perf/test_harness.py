"""`tokenratio perf` runs every row and reports consistent ratios (no timing assertions here: the
targets are checked by reading the harness's own side-by-side output, not by timed tests)."""

import json

import pytest

from tokenratio.cli import main


@pytest.mark.slow
def test_perf_harness_reports_every_row(tmp_path, capsys):
    rows = ["dpo", "tbpo-a", "tbpo-q", "tdpo2", "tdpo1[generator=sba]", "bpo", "tisdpo", "trl"]
    assert (
        main(
            [
                "perf",
                "--model",
                "tiny",
                "--rows",
                *rows,
                "--steps",
                "2",
                "--warmup",
                "1",
                "--repeats",
                "1",
                "--batch",
                "2",
                "--prompt-len",
                "16",
                "--response-len",
                "16",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "speed/TRL" in capsys.readouterr().out
    report = json.loads((tmp_path / "perf.json").read_text())
    by_row = {r["row"]: r for r in report["rows"]}
    assert set(by_row) == set(rows)
    assert by_row["dpo"]["step_vs_dpo"] == pytest.approx(1.0)
    assert by_row["trl"]["speed_vs_trl"] == pytest.approx(1.0)
    assert by_row["trl"]["tensor_mib"] is None  # measured for our rows only
    assert by_row["tbpo-a"]["tensor_vs_dpo"] > 0
    for r in report["rows"]:
        assert r["step_s"] > 0 and r["peak_mib"] > 0 and 0 < r["mfu"] < 1
        assert r["tokens_per_s"] == pytest.approx(report["config"]["tokens_per_step"] / r["step_s"])


def test_our_rows_time_the_trainers_own_step(monkeypatch):
    """The harness's row calls `trainer.train_step`, the function `tokenratio train` runs every
    optimizer step, once per warm-up and timed step and once more under the profiler."""
    from tokenratio import trainer
    from tokenratio.perf import worker

    calls = []
    real = trainer.train_step

    def counting(step, micro_batches):
        calls.append((step.loss.name, len(micro_batches)))
        return real(step, micro_batches)

    monkeypatch.setattr(trainer, "train_step", counting)
    args = {
        "model": "tiny",
        "device": "cpu",
        "dtype": "fp32",
        "batch": 2,
        "prompt_len": 8,
        "response_len": 8,
        "warmup": 1,
        "steps": 2,
    }
    times, tensor_peak = worker.run_ours("tdpo1[generator=sba]", args)
    assert len(times) == 2 and tensor_peak > 0
    assert calls == [("tdpo1", 1)] * 4  # 1 warm-up + 2 timed + 1 profiled
