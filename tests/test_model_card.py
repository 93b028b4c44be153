"""final/README.md (model_card.py): the card TRL users expect, loadable by huggingface_hub."""

import shlex

from test_trainer import run


def test_a_run_publishes_a_model_card_beside_its_weights(tiny_model_dir, hh_jsonl, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "r"
    options = {"loss.name": "tbpo-a", "loss.options.kl_estimator": "k3", "loss.beta": 0.2}
    records = run(tiny_model_dir, hh_jsonl, out, **options)
    card = ModelCard.load(out / "final" / "README.md")
    assert card.data.base_model == str(tiny_model_dir)
    assert card.data.library_name == "transformers" and card.data.datasets == [str(hh_jsonl)]
    assert {"tokenratio", "tbpo-a", "preference-optimization"} <= set(card.data.tags)
    text = card.text
    assert "**tbpo-a** (beta 0.2, kl_estimator k3)" in text
    accuracy = records[-1]["eval_reward_accuracy"]
    assert f"Implicit-reward accuracy **{accuracy:.3f}** (95% Wilson interval" in text
    assert "on 4 held-out pairs" in text
    assert "arXiv:2605.12288" in text and "@inproceedings" in text
    command = shlex.split(text.split("```bash\n")[1].split("\n```")[0])
    assert command[:2] == ["tokenratio", "train"]
    assert 'loss.options.kl_estimator="k3"' in command and f'train.output_dir="{out}"' in command
