"""`tokenratio perf` runs every row on the same batches and reports consistent ratios (no timing
assertions here: the targets are checked by reading the harness's own side-by-side output, not by
timed tests); its pairs follow the real data's lengths; it counts parameters without building the
model; it keeps finished rows when a later one fails."""

import json

import pytest

from tokenratio.cli import main
from tokenratio.perf import harness


@pytest.mark.slow
def test_perf_harness_reports_every_row_on_hh_lengths(tmp_path, capsys):
    # every loss runs the same step: test_train_step.py and test_scoring.py cover them all
    rows = ["dpo", "tbpo-a", "trl", "train", "dpo+prefix_sharing=false"]
    args = ["perf", "--model", "tiny", "--rows", *rows, "--steps", "2", "--warmup", "1"]
    args += ["--ab", "dpo+ref_cache=false:tbpo-a"]  # a switch, timed in the A/B worker
    args += ["--repeats", "1", "--batch", "2", "--max-length", "64", "--max-prompt-length", "32"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert "speed/TRL" in capsys.readouterr().out
    report = json.loads((tmp_path / "perf.json").read_text())
    assert report["complete"] and "hh-rlhf" in report["config"]["data"]
    by_row = {r["row"]: r for r in report["rows"]}
    assert set(by_row) == set(rows)
    assert by_row["dpo"]["step_vs_dpo"] == pytest.approx(1.0)
    assert by_row["trl"]["speed_vs_trl"] == pytest.approx(1.0)
    assert by_row["trl"]["tensor_mib"] is None  # measured for our rows only
    assert by_row["tbpo-a"]["tensor_vs_dpo"] > 0
    raw = report["raw"]
    shared = {raw[row][0]["real_tokens"] for row in ("dpo", "tbpo-a")}
    assert len(shared) == 1  # rows of one layout timed the same pairs: the same real tokens
    plain = {raw[row][0]["real_tokens"] for row in ("trl", "dpo+prefix_sharing=false")}
    assert len(plain) == 1
    computed = raw["dpo"][0]["computed_tokens"]
    assert computed < raw["dpo"][0]["real_tokens"]  # the prompt computed once per pair
    assert raw["train"][0]["real_tokens"] > 0  # tokenratio train's own logged tokens
    [ab] = report["ab"]  # one process, step by step: 2 x repeats rounds over the timed steps
    assert ab["rows"] == ["dpo+ref_cache=false", "tbpo-a"] and len(ab["ratios"]) == 2 * 2
    assert ab["ratio"] == pytest.approx(sorted(ab["ratios"])[1] / 2 + sorted(ab["ratios"])[2] / 2)
    text = (tmp_path / "perf.txt").read_text()
    assert "one process, step by step: tbpo-a / dpo+ref_cache=false" in text
    for r in report["rows"]:
        assert r["step_s"] > 0 and r["peak_mib"] > 0 and 0 < r["mfu"] < 1
        real_tokens = raw[r["row"]][0]["real_tokens"]
        assert r["tokens_per_s"] == pytest.approx(real_tokens / (r["step_s"] * 2))


def test_plans_group_one_pool_by_each_layouts_row_length():
    lengths = [(p, c, r) for p in (5, 50) for c in (3, 30) for r in (4, 40)] * 20
    drawn, plans, sources = harness.plan_batches(lengths, batch=4, steps=6)
    assert [lengths[i] for i in sources] == drawn  # each pair traced back to its record
    assert set(plans) == {"shared", "plain", "ungrouped"}
    for plan in plans.values():
        assert len(plan) == 6 and all(len(b) == 4 for b in plan)
    assert {i for plan in plans.values() for b in plan for i in b} == set(range(len(drawn)))

    def padding(plan, row):
        rows = [[row(*drawn[i]) for i in b] for b in plan]
        return sum(len(r) * max(r) - sum(r) for r in rows) / sum(len(r) * max(r) for r in rows)

    shared, plain = (lambda p, c, r: p + c + r), (lambda p, c, r: p + max(c, r))
    assert padding(plans["shared"], shared) < 0.1 < padding(plans["ungrouped"], shared)
    assert padding(plans["plain"], plain) < 0.1


def test_hh_lengths_follow_the_trainers_cut():
    from tokenratio.perf.lengths import DEFAULT_DATA, dataset_lengths

    lengths = dataset_lengths(DEFAULT_DATA, 2048, 96, 48)
    assert len(lengths) > 2000
    assert all(1 <= p <= 48 and p + max(c, r) <= 96 and c >= 1 and r >= 1 for p, c, r in lengths)
    assert len({p for p, _, _ in lengths}) > 20  # real, varied lengths


def test_parameters_are_counted_without_building_the_model():
    import torch

    from tokenratio.perf.models import build_model, count_params

    assert count_params("tiny") == sum(p.numel() for p in build_model("tiny").parameters())
    assert count_params("llama3.2-1b") == pytest.approx(1.50e9, rel=0.02)  # untied 128k head
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # the meta device did not leak


def test_a_failed_row_leaves_the_finished_rows_on_disk(tmp_path, monkeypatch):
    calls = []

    def fake(common, row):
        calls.append(row)
        if row == "tbpo-a":
            raise RuntimeError("perf row tbpo-a failed")
        return {
            "times": [1.0],
            "seconds": 1.0,
            "step_s": 1.0,
            "real_tokens": 100,
            "response_tokens": 40,
            "padded_tokens": 110,
            "computed_tokens": 100,
            "tensor_peak_bytes": None,
            "peak_bytes": 2**20,
        }

    monkeypatch.setattr(harness, "_measure_row", fake)
    with pytest.raises(RuntimeError):
        harness.run_perf(
            model="tiny",
            rows=["dpo", "tbpo-a"],
            steps=1,
            warmup=0,
            batch=2,
            repeats=1,
            out=tmp_path,
            progress=lambda *_: None,
        )
    report = json.loads((tmp_path / "perf.json").read_text())
    assert calls == ["dpo", "tbpo-a"] and not report["complete"]
    assert [r["row"] for r in report["rows"]] == ["dpo"]


def test_our_rows_time_the_trainers_own_step(monkeypatch):
    """The harness's row calls `step.train_step`, the function `tokenratio train` runs every
    optimizer step, once per warm-up and timed step and once more under the profiler."""
    from tokenratio import step as step_module
    from tokenratio.perf import worker

    calls = []
    real = step_module.train_step

    def counting(step, micro_batches):
        calls.append((step.loss.name, len(micro_batches)))
        return real(step, micro_batches)

    monkeypatch.setattr(step_module, "train_step", counting)
    lengths, plans, _ = harness.plan_batches([(8, 5, 6), (6, 9, 3)], batch=2, steps=3)
    args = {"model": "tiny", "device": "cpu", "dtype": "fp32", "batch": 2, "warmup": 1}
    args.update(lengths=lengths, plans=plans)
    measured = worker.run_ours("tdpo1[generator=sba]+prefix_sharing=false", args)
    assert len(measured["times"]) == 2 and measured["tensor_peak_bytes"] > 0
    assert calls == [("tdpo1", 1)] * 4  # 1 warm-up + 2 timed + 1 profiled
    assert measured["real_tokens"] == measured["computed_tokens"]  # plain rows: no shared prompt


def test_a_long_row_is_never_silent():
    import time

    from tokenratio.perf.harness import heartbeat

    said = []
    with heartbeat("repeat 1/1 dpo", said.append, every=0.05):
        time.sleep(0.18)
    assert len(said) >= 2 and said[0].startswith("  repeat 1/1 dpo: still running, ")
    count = len(said)
    time.sleep(0.1)
    assert len(said) == count  # stopped with the row
