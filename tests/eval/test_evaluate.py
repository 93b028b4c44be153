"""`tokenratio eval` end to end, with both judges, on a tiny model and on SmolLM2."""

import json
import re

import pytest

from judge_stub import StubJudge
from tiny import HH_PATH
from tokenratio.cli import main


@pytest.mark.slow
def test_eval_end_to_end_with_both_judges(
    tiny_model_dir, hh_jsonl, reward_model_dir, stub_server, tmp_path, capsys
):
    common = [
        "eval",
        "--model",
        f"base={tiny_model_dir}",
        "--model",
        f"again={tiny_model_dir}",
        "--reference",
        str(tiny_model_dir),
        "--data",
        str(hh_jsonl),
        "--num-prompts",
        "6",
        "--num-pairs",
        "8",
        "--max-new-tokens",
        "12",
    ]
    assert (
        main(
            [*common, "--judge", f"reward-model:{reward_model_dir}", "--out", str(tmp_path / "rm")]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "| base |" in table and "LC win %" in table
    results = json.loads((tmp_path / "rm" / "results.json").read_text())["results"]
    base, again = results
    for key in (
        "pref_accuracy",
        "reward_margin",
        "kl_to_ref",
        "entropy",
        "self_bleu",
        "distinct_1",
        "win_rate",
        "lc_win_rate",
    ):
        assert key in base, key
    assert base["pref_accuracy"][0] == 0.5 and base["kl_to_ref"][0] == pytest.approx(0, abs=1e-5)
    assert base["samples"] == again["samples"]  # seeded generation
    assert len(base["samples"]) == 6 and all(len(g) == 5 for g in base["samples"])
    assert (
        main(
            [
                *common,
                "--judge",
                f"openai:{stub_server}",
                "--versus",
                "base",
                "--out",
                str(tmp_path / "chat"),
            ]
        )
        == 0
    )
    chat = json.loads((tmp_path / "chat" / "results.json").read_text())["results"]
    # Identical samples: the stub always answers "A", and the judge's seeded order swap turns that
    # position bias into as many losses as wins (3 of 6 with seed 0) instead of a 100% win rate.
    assert chat[1]["win_rate"][0] == 50.0
    assert StubJudge.calls == 6
    assert (tmp_path / "chat" / "results.md").read_text().startswith("| model |")


HH = HH_PATH


@pytest.mark.slow
def test_eval_on_smollm2_over_20_hh_prompts(smollm2_dir, reward_model_dir, tmp_path, capsys):
    """The real model over 20 HH-RLHF harmless prompts, with a local reward-model judge: every
    metric of the paper but the remote LLM judge."""
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--model",
                f"smollm2={smollm2_dir}",
                "--reference",
                str(smollm2_dir),
                "--data",
                str(HH),
                "--num-prompts",
                "20",
                "--num-pairs",
                "8",
                "--max-new-tokens",  # the paper's 128 took 7 minutes on this 2-core VM
                "48",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "results.json").read_text())["results"][0]
    assert len(result["samples"]) == 20 and all(len(g) == 5 for g in result["samples"])
    assert 0 < result["entropy"][0] < 3.0  # a real model is far from uniform over its top 20
    assert 0 <= result["self_bleu"][0] <= 100 and 0 < result["distinct_1"][0] <= 1
    assert result["kl_to_ref"][0] == pytest.approx(0, abs=2e-3)  # float32 over a 49k vocabulary
    assert "smollm2" in capsys.readouterr().out


def test_eval_of_a_run_uses_its_held_out_split_and_warns_about_training_pairs(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    from test_trainer import run
    from tokenratio.provenance import read_splits

    out = tmp_path / "run"
    run(tiny_model_dir, hh_jsonl, out, **{"loss.name": "dpo", "data.heldout_fraction": 0.2})
    splits = read_splits(out)
    heldout = splits["heldout"]["records"]
    assert len(heldout) == 19 and not set(heldout) & set(splits["train"]["records"])
    common = ["eval", "--model", f"dpo={out}", "--num-prompts", "0", "--num-pairs", "64"]

    assert main([*common, "--out", str(tmp_path / "own")]) == 0
    assert "WARNING" not in capsys.readouterr().err
    own = json.loads((tmp_path / "own" / "results.json").read_text())
    assert own["config"]["records"] == heldout and own["config"]["data"] == str(hh_jsonl)
    assert own["results"][0]["trained_on_records"] == 0

    assert main([*common, "--data", str(hh_jsonl), "--offset", "10", "--num-pairs", "20",
                 "--out", str(tmp_path / "file")]) == 0  # fmt: skip
    expected = len(set(range(10, 30)) & set(splits["train"]["records"]))
    assert expected > 10
    err = capsys.readouterr().err
    assert f"WARNING: {expected} of the 20 evaluated records are in the training data" in err
    result = json.loads((tmp_path / "file" / "results.json").read_text())["results"][0]
    assert result["trained_on_records"] == expected
    trained = splits["train"]["records"][0]  # explain on a training record says so too
    assert main(["explain", "--model", str(out), "--data", str(hh_jsonl), "--index",
                 str(trained), "--out", str(tmp_path / "ex")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "WARNING: 1 of the 1 evaluated records are in the training data" in err
    assert "without --data" not in err and "splits.json" in err  # explain needs --data


@pytest.mark.parametrize(
    "mode, flags, message",
    [
        ("zebra", [], r"3 of 3 judge verdicts for base were unparseable"),
        ("trickle", ["--judge-timeout", "0.3", "--judge-retries", "0"], r"failed 1 times"),
        ("", ["--judge-deadline", "0.5"], r"deadline \(0.5 s, --judge-deadline\) passed"),
    ],
)
def test_a_failing_judge_keeps_the_other_metrics(
    tiny_model_dir, hh_jsonl, stub_server, tmp_path, capsys, mode, flags, message
):
    StubJudge.mode, StubJudge.delay = mode, (2.0 if not mode else 0.0)
    out = tmp_path / "eval"
    args = ["eval", "--model", f"base={tiny_model_dir}", "--reference", str(tiny_model_dir),
            "--data", str(hh_jsonl), "--num-prompts", "3", "--num-pairs", "4", "--samples", "2",
            "--max-new-tokens", "4", "--judge", f"openai:{stub_server}", "--out", str(out)]  # fmt: skip
    assert main([*args, *flags]) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
    result = json.loads((out / "results.json").read_text())["results"][0]
    assert "pref_accuracy" in result and "self_bleu" in result and "win_rate" not in result


def _with_bad_lines(hh_jsonl, path, bad: int, total: int = 20):
    lines = hh_jsonl.read_text().splitlines()[: total - bad]
    path.write_text("\n".join(lines + ['{"chosen": "cut sh'] * bad) + "\n")
    return path


def test_eval_skips_bad_records_only_when_asked_and_says_how_many(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    data = _with_bad_lines(hh_jsonl, tmp_path / "bad.jsonl", bad=7)
    out = tmp_path / "eval"
    args = ["eval", "--model", f"base={tiny_model_dir}", "--reference", str(tiny_model_dir),
            "--data", str(data), "--num-prompts", "0", "--num-pairs", "20", "--out", str(out)]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 14: malformed JSON" in err[0], err  # the way out on it too
    assert "--on-invalid skip" in err[0] and "data.on_invalid" not in err[0]
    assert main([*args, "--on-invalid", "skip"]) == 0
    said = capsys.readouterr().out
    assert "eval: skipped 7 invalid records" in said and "malformed JSON: 7" in said
    result = json.loads((out / "results.json").read_text())["results"][0]
    assert result["skipped_records"] == {"malformed JSON": 7}
    assert result["pref_accuracy"][0] >= 0  # the 13 good pairs evaluated


def test_damaged_weights_are_one_line_in_eval_and_explain(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    for damage in (weights.read_bytes()[:64], b"", b"\x00garbage" * 10):
        weights.write_bytes(damage)
        assert main(["eval", "--model", f"m={model}", "--reference", str(tiny_model_dir),
                     "--data", str(hh_jsonl), "--num-prompts", "0", "--num-pairs", "2",
                     "--out", str(tmp_path / "eval")]) == 1  # fmt: skip
        assert main(["explain", "--model", str(model), "--reference", str(tiny_model_dir),
                     "--data", str(hh_jsonl), "--out", str(tmp_path / "ex")]) == 1  # fmt: skip
        stderr = capsys.readouterr().err  # also transformers' bars, loading the good reference
        err = [line for line in stderr.splitlines() if line.startswith("tokenratio ")]
        assert len(err) == 2 and all("the model could not be loaded" in e for e in err), err
        assert all("model.safetensors" in e for e in err)
        assert "tokenratio/modeling.py" not in stderr  # no traceback through our loading code


def _naive_response_values(model, reference, prompt, response):
    """log pi(y) - log pi_ref(y) and sum_t KL(pi || pi_ref) over one response, from full logits."""
    import torch

    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = model(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
        ref = reference(ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
    target = torch.tensor(response)[:, None]
    ratio = (logp.gather(-1, target) - ref.gather(-1, target)).sum()
    kl = (logp.exp() * (logp - ref)).sum()
    return float(ratio), float(kl)


def test_preference_metrics_match_a_naive_full_logits_computation(tiny_model_dir, hh_jsonl):
    """Accuracy, margins and KL(pi || pi_ref) of a policy that differs from its reference, from
    the fused head's one pass over both models, equal log_softmax over full logits per pair."""
    from tiny import load_tiny_pairs, perturbed
    from tokenratio.eval.evaluate import preference_metrics

    reference, tokenizer, pairs = load_tiny_pairs(tiny_model_dir, hh_jsonl, limit=5)
    model = perturbed(reference, scale=0.05).eval()
    beta = 0.1
    result = preference_metrics(model, reference.eval(), pairs, tokenizer.pad_token_id, beta, 2)
    margins, kls, correct = [], [], []
    for pair in pairs:
        chosen, kl_c = _naive_response_values(
            model, reference, pair["prompt_ids"], pair["chosen_ids"]
        )
        rejected, kl_r = _naive_response_values(
            model, reference, pair["prompt_ids"], pair["rejected_ids"]
        )
        margins.append(beta * (chosen - rejected))
        correct.append(float(chosen > rejected))
        kls += [kl_c, kl_r]
    assert result["per_pair"]["margin"] == pytest.approx(margins, rel=1e-4, abs=1e-6)
    assert result["per_pair"]["correct"] == correct
    assert result["kl_to_ref"][0] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert min(kls) > 0


def test_eval_of_a_run_scores_its_whole_held_out_split_as_train_reported_it(
    tiny_model_dir, hh_jsonl, tmp_path
):
    """No --num-pairs: every held-out pair (19 here, more than eval's 64-pair default of --data
    would matter for), the accuracy train logged at its end with the same Wilson interval, and a
    results.md whose `|` inside a header is escaped (a valid GitHub table)."""
    from test_trainer import run
    from tokenratio.intervals import accuracy_interval

    out = tmp_path / "run"
    records = run(
        tiny_model_dir, hh_jsonl, out, **{"loss.name": "dpo", "data.heldout_fraction": 0.2}
    )
    trained = records[-1]["eval_reward_accuracy"]
    argv = ["eval", "--model", f"dpo={out}", "--num-prompts", "0", "--mixed-precision", "no"]
    assert main([*argv, "--out", str(tmp_path / "e")]) == 0
    result = json.loads((tmp_path / "e" / "results.json").read_text())["results"][0]
    assert result["pairs"] == 19
    assert result["pref_accuracy"][0] == pytest.approx(trained)
    low, high = accuracy_interval(trained, 19)
    assert result["pref_accuracy_interval"] == pytest.approx([low, high])
    table = (tmp_path / "e" / "results.md").read_text().splitlines()
    assert "KL(pi\\|\\|ref)" in table[0]
    assert all(row.count("|") - row.count("\\|") == table[0].count("|") - table[0].count("\\|")
               for row in table[:3])  # fmt: skip
    assert f"({low:.3f}-{high:.3f})" in table[2] and "Wilson" in "\n".join(table)
