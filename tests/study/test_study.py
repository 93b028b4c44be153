"""`tokenratio study` end to end on the tiny model: 2 losses x 1 seed x 2 steps; the report's
structure, disjoint splits, and a rerun that finds everything done."""

import json
import os
import re
from pathlib import Path

import pytest

from tokenratio.cli import main
from tokenratio.study.splits import SPLITS, check_disjoint, make_splits

pytestmark = pytest.mark.slow


def write_config(path, model_dir, data, out):
    path.write_text(
        f"""
[model]
name_or_path = "{model_dir}"
lora_r = 4
lora_alpha = 8
lora_dropout = 0.0
lora_last_layers = 1

[data]
path = "{data}"
max_length = 256
max_prompt_length = 192
on_invalid = "skip"

[train]
optimizer = "adamw"
batch_size = 2
max_steps = 2
warmup_ratio = 0.0
trunk_cache = true
save_merged = false

[study]
methods = ["dpo", "tdpo1[generator=sba]"]
lrs = [1e-3, 1e-2]
seeds = [0]
train_pairs = 40
valid_pairs = 16
test_pairs = 16
output_dir = "{out}"

[study.eval]
num_prompts = 2
samples = 2
max_new_tokens = 8
"""
    )
    return path


def test_study_runs_selects_lr_evaluates_on_test_and_reports(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    out = tmp_path / "study"
    config = write_config(tmp_path / "study.toml", tiny_model_dir, hh_jsonl, out)
    assert main(["study", str(config), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| reference | 1 |" in printed and "recipe" in printed
    # each run's own lines go to its log, so the study's terminal keeps one line per run
    assert "launch:" not in printed and "precision:" not in printed
    assert "launch: 1 process" in (out / "logs" / "dpo-b0.1-lr0.001-s0.log").read_text()
    assert "precision:" in (out / "logs" / "test-dpo-b0.1-lr0.001-s0.log").read_text()

    report = json.loads((out / "report.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["reference", "dpo", "tdpo1[generator=sba]"]
    for row in report["rows"]:
        for key in ("pref_accuracy", "kl_per_token", "entropy", "self_bleu", "distinct_1"):
            assert row[key]["n"] == 1 and row[key]["mean"] == row[key]["mean"]  # not nan
    for selection in report["selection"]:
        assert [t["lr"] for t in selection["tried"]] == [1e-3, 1e-2]
        assert selection["lr"] in (1e-3, 1e-2)
    assert report["command"].startswith("tokenratio study")
    markdown = (out / "report.md").read_text()
    assert "| method | n | test acc." in markdown and "Learning-rate selection" in markdown
    assert "## Every run" in markdown
    for said in (report["verdicts"], report["check"]):  # computed once: both print these strings
        assert said in printed and said in markdown
    assert re.search(r"\| dpo-b0\.1-lr0\.0?01-s0 \| 0 \| 0\.0?01 \| 0\.\d+ \| 0\.\d+ ± ", markdown)
    for name in ("accuracy_vs_kl.png", "entropy_vs_self_bleu.png", "training_curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    check_disjoint(out / "data" / "splits.json")
    texts = {n: set((out / "data" / f"{n}.jsonl").read_text().splitlines()) for n in SPLITS}
    assert [len(texts[n]) for n in SPLITS] == [40, 16, 16]
    assert not texts["test"] & (texts["train"] | texts["valid"])

    for result in report["results"]["dpo"]:
        outcomes = result["per_pair"]
        assert 10 < len(outcomes["correct"]) == len(outcomes["record"]) <= 16
    compared = {(c["method"], c["baseline"]): c for c in report["comparisons"]}
    assert set(compared) == {
        ("dpo", "reference"), ("tdpo1[generator=sba]", "dpo"),
        ("tdpo1[generator=sba]", "reference"),
    }  # fmt: skip
    for entry in compared.values():
        assert entry["low"] <= entry["diff"] <= entry["high"] and 0 <= entry["p_value"] <= 1
        assert entry["verdict"] in ("better", "worse", "no difference detectable")
    assert "## Verdicts" in markdown and "vs reference" in markdown

    # adapters only (no merged copy), which from_pretrained loads onto the base model
    finals = sorted((out / "runs").glob("*/final/adapter_model.safetensors"))
    assert len(finals) == 4 and not list((out / "runs").glob("*/final/model.safetensors"))
    caches = Path(os.environ["TOKENRATIO_CACHE_DIR"])  # conftest: never in the user's ~/.cache
    assert list(caches.glob("trunk/*/shard-*.safetensors"))  # the frozen trunk, kept
    stamps = [p.stat().st_mtime_ns for p in finals]
    assert main(["study", str(config)]) == 0  # everything found: nothing retrained
    assert "found, skipped" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in finals] == stamps

    # other settings than the runs were made with: refused in one line naming them
    changed = ["study", str(config), "--set", "train.max_steps=3"]
    assert main(changed) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.max_steps: 2 -> 3" in err[0] and "--overwrite" in err[0]
    assert [p.stat().st_mtime_ns for p in finals] == stamps

    # a damaged line in a run's log: one line naming the file and the line, no traceback
    log = out / "runs" / "dpo-b0.1-lr0.001-s0" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], '{"step": 2, "loss": ', *lines[1:]]) + "\n")
    assert main(["study", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{log}, line 2: not a JSON record" in err[0]
    log.write_text("\n".join(lines) + "\n")

    # an empty study file (a kill mid-write by an older version, a full disk): one line naming it
    for damaged in (
        out / "runs" / "dpo-b0.1-lr0.001-s0" / "study_run.json",
        out / "runs" / "dpo-b0.1-lr0.001-s0" / "config.json",
        out / "data" / "splits.json",
        out / "test" / "dpo-b0.1-lr0.001-s0" / "results.json",
    ):
        kept = damaged.read_bytes()
        damaged.write_text("")
        assert main(["study", str(config)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{damaged} is damaged" in err[0], err
        damaged.write_bytes(kept)


def test_a_second_study_into_the_same_directory_is_refused(tiny_model_dir, hh_jsonl, tmp_path):
    import socket

    from tokenratio.rundir import RunDirError
    from tokenratio.study.config import load_study
    from tokenratio.study.runner import run_study

    out = tmp_path / "study"
    out.mkdir()
    holder = {"pid": os.getppid(), "host": socket.gethostname()}  # a live process: pytest's parent
    (out / ".lock").write_text(json.dumps(holder))
    study, base = load_study(write_config(tmp_path / "s.toml", tiny_model_dir, hh_jsonl, out))
    with pytest.raises(RunDirError, match=r"study.output_dir .* in use by a live study"):
        run_study(study, base, progress=False)


def test_print_config_shows_the_resolved_study(tiny_model_dir, hh_jsonl, tmp_path, capsys):
    config = write_config(tmp_path / "s.toml", tiny_model_dir, hh_jsonl, tmp_path / "out")
    assert main(["study", str(config), "--print-config", "--set", "study.seeds=[3]"]) == 0
    printed = capsys.readouterr().out
    assert "[study]\n" in printed and "seeds = [3]" in printed and "[study.eval]" in printed
    assert "trunk_cache = true" in printed
    assert not (tmp_path / "out").exists()


def test_splits_refuse_more_pairs_than_the_data_has(hh_jsonl, tmp_path):
    from tokenratio.data import DataError

    with pytest.raises(DataError, match="distinct records"):
        make_splits(str(hh_jsonl), {"train": 90, "valid": 10, "test": 10}, 0, tmp_path)


def test_results_made_from_other_inputs_are_refused_never_reused(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    """Issue 39.2: a changed split seed (same paths, other pairs), and an adapter swapped between
    two runs, are refused in one line naming what changed; --overwrite redoes them."""
    import shutil

    out = tmp_path / "study"
    config = write_config(tmp_path / "s.toml", tiny_model_dir, hh_jsonl, out)
    one = ["--set", "study.lrs=[1e-3]", "--set", "study.eval.num_prompts=1", "--no-progress"]
    assert main(["study", str(config), *one]) == 0
    capsys.readouterr()
    assert main(["study", str(config), *one, "--set", "study.split_seed=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed by content: train, valid" in err[0], err
    runs = sorted(p for p in (out / "runs").iterdir())
    a, b = runs[0] / "final", runs[1] / "final"
    shutil.move(a, tmp_path / "swap")
    shutil.move(b, a)
    shutil.move(tmp_path / "swap", b)
    assert main(["study", str(config), *one]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other inputs than this study's" in err[0], err
    assert f"test/{runs[0].name}" in err[0] or f"test/{runs[1].name}" in err[0]
    assert main(["study", str(config), *one, "--overwrite"]) == 0
