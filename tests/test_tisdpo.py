"""`tokenratio tisdpo` end to end on a tiny real Llama and real HH-RLHF rows: two contrastive DPO
models, token weights checked against an independent recomputation, TIS-DPO training, resume."""

import json
import math

import pytest
import torch

from test_trainer import overrides
from tokenratio.cli import main
from tokenratio.data import tokenize_record

pytestmark = pytest.mark.slow


def naive_response_logps(model, prompt_ids, response_ids):
    """log p(response token | prefix) from one unpadded forward and a full log_softmax."""
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(response_ids)[:, None]).squeeze(-1)


def test_pipeline_scores_tokens_trains_tisdpo_and_resumes(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = overrides(tiny_model_dir, hh_jsonl, tmp_path, **{"tisdpo.score_batch_size": 5})
    assert main(["tisdpo", *args, "--no-progress"]) == 0
    positive = AutoModelForCausalLM.from_pretrained(tmp_path / "contrast-positive" / "final")
    negative = AutoModelForCausalLM.from_pretrained(tmp_path / "contrast-negative" / "final")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(positive.parameters(), negative.parameters(), strict=True)
    )

    scored = [json.loads(line) for line in (tmp_path / "weights" / "train.jsonl").open()]
    assert 80 <= len(scored) <= 96  # the valid records (overlong prompts skipped)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for record in scored[:3]:
        ids = tokenize_record(record, "hh-chat", tokenizer, 384, 256)  # the tiny chat template
        for side in ("chosen", "rejected"):
            expected = naive_response_logps(
                positive, ids["prompt_ids"], ids[f"{side}_ids"]
            ) - naive_response_logps(negative, ids["prompt_ids"], ids[f"{side}_ids"])
            contrast = torch.tensor(record[f"{side}_contrast"])
            assert contrast.shape == expected.shape  # one per response token, EOS included
            torch.testing.assert_close(contrast, expected, atol=1e-4, rtol=1e-4)
            mu = 1.0 if side == "chosen" else -1.0
            weight = torch.exp(mu * contrast.clamp(-1.0, 1.0))  # default lower, upper, scale
            torch.testing.assert_close(torch.tensor(record[f"{side}_weight"]), weight)
    assert all(math.exp(-1) - 1e-6 <= w <= math.e + 1e-6 for w in scored[0]["chosen_weight"])

    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    train = [m for m in metrics if "weighted_margin" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert any("eval_weighted_accuracy" in m for m in metrics)
    tisdpo = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(tisdpo.parameters(), positive.parameters(), strict=True)
    )
    assert json.loads((tmp_path / "config.json").read_text())["loss"]["name"] == "tisdpo"

    capsys.readouterr()
    assert main(["tisdpo", *args, "--no-progress"]) == 0  # everything done: every stage skips
    out = capsys.readouterr().out
    assert out.count("contrast model found") == 2 and "weights found" in out
    assert "final is complete: nothing to do" in out


def test_training_tisdpo_on_unscored_data_says_how_to_score(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    args = overrides(tiny_model_dir, hh_jsonl, tmp_path, **{"loss.name": "tisdpo"})
    assert main(["train", *args, "--no-progress"]) == 1
    assert "tokenratio tisdpo" in capsys.readouterr().err
