"""`tokenratio` end to end through `main(argv)`."""

import json

import pytest

from tokenratio.cli import main


@pytest.mark.slow
def test_bench_quick_writes_table_json_and_plots(tmp_path, capsys):
    assert main(["bench", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    for method in ("dpo", "tbpo-q", "tbpo-a", "tisdpo", "opt-seq", "opt-tok"):
        assert method in table
    assert (tmp_path / "finite.txt").read_text() in table
    results = json.loads((tmp_path / "finite.json").read_text())
    methods = {row["method"] for row in results["summary"]}
    assert {"dpo", "ipo", "bpo", "tdpo1", "tdpo2", "tisdpo", "tbpo-q", "tbpo-a"} <= methods
    for run in results["runs"]:  # every method learns something from pi_ref
        assert run["final"]["kl_ref"] > 0.01
        assert run["final"]["heldout_acc"] > 0.6
    for name in ("frontier.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_bench_refuses_to_replace_an_earlier_benchmark_without_overwrite(tmp_path, capsys):
    (tmp_path / "population.json").write_text("{}")  # an earlier --population run's results
    argv = ["bench", "--population", "--losses", "dpo", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "population.json holds an earlier benchmark's results: give --overwrite" in err
    assert (tmp_path / "population.json").read_text() == "{}"
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((tmp_path / "population.json").read_text())


def test_bench_rejects_unknown_loss(capsys):
    assert main(["bench", "--losses", "dpo", "nope", "--no-progress"]) == 2
    assert "valid losses" in capsys.readouterr().err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "bench" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--population", "--seeds", "1"], "--seeds"),
        (["--transformer", "--quick"], "--quick"),
        (["--population", "--lr", "0.1", "--steps", "5"], "--steps, --lr"),
        (["--population", "--transformer"], "separate regimes"),
        (["--transformer", "--betas", "1", "2"], "one --betas value"),
        (["--losses", "dpo", "--loss-option", "tbpo-a.kl_estimator=k3"], "does not run"),
        (["--losses", "tbpo-a", "--loss-option", "tbpo-a.kl_estimatr=k3"], "for loss 'tbpo-a'"),
        (["--losses", "tbpo-a", "--loss-option", "kl_estimator=k3"], "LOSS.OPTION=VALUE"),
    ],
)
def test_bench_refuses_what_the_regime_would_ignore(argv, named, tmp_path, capsys):
    assert main(["bench", *argv, "--out", str(tmp_path), "--no-progress"]) == 2
    assert named in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work


def fake_run(root, beta, reference, data=None):
    (root / "final").mkdir(parents=True)
    (root / "final" / "COMPLETE").write_text("")
    config = {"model": {"name_or_path": reference}, "loss": {"beta": beta}, "train": {}}
    (root / "config.json").write_text(json.dumps({**config, **({"data": data} if data else {})}))
    return root


def test_eval_reads_beta_and_reference_from_the_runs_and_flags_override(tmp_path):
    import argparse

    from tokenratio.cli.eval import resolve_models

    a = fake_run(tmp_path / "a", 0.25, "models/base")
    b = fake_run(tmp_path / "b", 0.25, "models/base")

    def args(*models, reference=None, beta=None):
        return argparse.Namespace(
            model=list(models), reference=reference, beta=beta, max_length=None,
            max_prompt_length=None,
        )  # fmt: skip

    models, reference, beta, chat = resolve_models(args(f"x={a}", f"y={b}/final"))
    assert models == (("x", str(a / "final")), ("y", str(b / "final")))
    assert (reference, beta, chat) == ("models/base", 0.25, False)  # no data.chat_template: raw
    assert resolve_models(args(f"x={a}", reference="other", beta=0.5))[1:3] == ("other", 0.5)
    assert resolve_models(args("plain/dir"))[1:] == (None, 0.1, None)  # not a run: defaults
    fake_run(tmp_path / "c", 1.0, "models/base")
    with pytest.raises(ValueError, match="disagree on beta"):
        resolve_models(args(f"x={a}", f"z={tmp_path / 'c'}"))


@pytest.mark.parametrize("path", ["runs/missing-run", "./missing", "/no/such/model", "a/b/c"])
def test_local_looking_model_paths_that_do_not_exist_fail_at_once(
    path, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "d.jsonl").write_text("")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # even online: never sent to the hub
    assert main(["eval", "--model", f"x={path}", "--data", "d.jsonl", "--num-prompts", "0"]) == 1
    assert main(["train", "--set", f"model.name_or_path={path}", "--set", "data.path=d.jsonl",
                 "--set", f"train.output_dir={tmp_path / 'out'}"]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tokenratio eval: model path {path} does not exist",
                   f"tokenratio train: model.name_or_path: {path} does not exist"]  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--set", "model.name_or_path=./nope", "--set", "data.path=d.jsonl"],
        ["train", "--set", "model.name_or_path=m", "--set", "data.path=./missing.jsonl"],
        ["tisdpo", "--set", "model.name_or_path=./nope", "--set", "data.path=d.jsonl"],
        ["eval", "--model", "x=./nope", "--data", "d.jsonl"],
    ],
)
def test_bad_paths_fail_before_torch_is_imported(argv, tmp_path):
    """What makes them fail in a fraction of a second: the check runs before torch loads."""
    import subprocess
    import sys

    (tmp_path / "d.jsonl").write_text("")
    code = (
        "import sys; from tokenratio.cli import main; rc = main(sys.argv[1:]); "
        "print('torch' in sys.modules); sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 1 and result.stdout.strip() == "False", result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "does not exist" in result.stderr


def test_eval_scores_with_the_runs_lengths_unless_the_flags_say_otherwise(tmp_path):
    import argparse

    from tokenratio.cli.eval import resolve_models

    lengths = {"max_length": 112, "max_prompt_length": 48}
    a = fake_run(tmp_path / "a", 0.1, "models/base", data=lengths)
    flags = {"reference": None, "beta": None, "max_length": None, "max_prompt_length": None}
    args = argparse.Namespace(model=[f"x={a}"], **flags)
    resolve_models(args)
    assert (args.max_length, args.max_prompt_length) == (112, 48)
    args = argparse.Namespace(model=[f"x={a}"], **{**flags, "max_length": 64})
    resolve_models(args)
    assert (args.max_length, args.max_prompt_length) == (64, 48)
    plain = argparse.Namespace(model=["plain/dir"], **flags)
    resolve_models(plain)
    assert (plain.max_length, plain.max_prompt_length) == (512, 384)  # eval's defaults


def test_eval_refuses_a_run_without_a_complete_final_model_in_one_line(tmp_path, capsys):
    from tiny import write_hh_jsonl

    run = fake_run(tmp_path / "run", 0.1, "models/base")
    (run / "final" / "COMPLETE").unlink()  # interrupted while publishing
    (run / "checkpoints" / "step-000004").mkdir(parents=True)
    (run / "checkpoints" / "step-000004" / "trainer_state.json").write_text('{"step": 4}')
    data = write_hh_jsonl(tmp_path / "d.jsonl", 4)
    assert main(["eval", "--model", f"x={run}", "--data", str(data)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "without a complete final/ model" in err[0], err
    assert "step-000004" in err[0] and "--resume" in err[0]


def test_eval_refuses_one_sample_before_loading_anything(tmp_path, capsys):
    code = main(["eval", "--model", "x=./nope", "--data", "d.jsonl", "--samples", "1"])
    assert code == 1 and "self-BLEU needs at least 2 samples" in capsys.readouterr().err


def test_train_summary_gives_the_held_out_interval_and_names_checkpoints_only_if_any(tmp_path):
    from tokenratio.cli.common import train_summary as summary

    result = {
        "step": 4,
        "seconds": 60,
        "eval_reward_accuracy": 0.62,
        "data": {"heldout_pairs": 200},
    }
    text = summary(result, str(tmp_path))
    assert "reward accuracy 0.620 on 200 pairs, 95% interval 0.551-0.684: above chance" in text
    assert "checkpoints:" not in text
    (tmp_path / "checkpoints" / "step-000004").mkdir(parents=True)
    assert "checkpoints:" in summary({**result, "eval_reward_accuracy": 0.5}, str(tmp_path))
    assert "not distinguishable from chance" in summary(
        {**result, "eval_reward_accuracy": 0.5}, str(tmp_path)
    )


@pytest.mark.parametrize("damage", [b"", b'{"model": {"name_or', b"\x00\xff garbage"])
def test_damaged_run_files_are_one_line_naming_them(tmp_path, damage):
    from tokenratio.cli.common import trained_run
    from tokenratio.provenance import SPLITS_NAME, read_splits
    from tokenratio.rundir import RunDirError, _resume_changes

    run = fake_run(tmp_path / "run", 0.1, "models/base")
    config = run / "config.json"
    config.write_bytes(damage)
    with pytest.raises(ValueError, match="not a readable run config") as err:
        trained_run(str(run))
    assert str(config) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RunDirError, match="not a readable run config"):
        _resume_changes(run, None)
    (run / SPLITS_NAME).write_bytes(damage or b"[]")
    with pytest.raises(ValueError, match="evaluate with --data instead") as err:
        read_splits(run)
    assert str(run / SPLITS_NAME) in str(err.value)
