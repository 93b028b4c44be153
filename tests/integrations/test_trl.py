"""The TRL integration: TBPOTrainer against TRL's own DPOTrainer on the same model and batch.

Written for TRL 1.x (the `compute_loss` extension point and `completion_mask` batches of 1.0+)."""

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from packaging.version import Version

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.slow
assert Version("1.0") <= Version(trl.__version__) < Version("2"), trl.__version__


def hh_dataset(n=24):
    from datasets import Dataset

    from tiny import hh_records
    from tokenratio.formats import to_text

    rows = [
        dict(zip(("prompt", "chosen", "rejected"), to_text(r, "hh"), strict=True))
        for r in hh_records(n)
    ]
    return Dataset.from_list(rows)


def config(tmp_path, **extra):
    from tokenratio.integrations.trl import TBPOConfig

    values = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        per_device_train_batch_size=2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        max_length=256,
        learning_rate=1e-3,
        seed=0,
        dataloader_num_workers=0,
    )
    values.update(extra)
    return TBPOConfig(**values)


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def test_dpo_loss_and_gradients_equal_trl_sigmoid(tiny_model_dir, tmp_path):
    from trl import DPOConfig, DPOTrainer

    from tokenratio.integrations.trl import TBPOTrainer

    model, tokenizer = load(tiny_model_dir)
    data = hh_dataset(8)
    theirs = DPOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(model),
        args=DPOConfig(
            output_dir=str(tmp_path / "trl"),
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            report_to=[],
            max_length=256,
            loss_type=["sigmoid"],
            beta=0.1,
        ),
        train_dataset=data,
        processing_class=tokenizer,
    )
    ours = TBPOTrainer(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(model),
        args=config(tmp_path / "ours", tokenratio_loss="dpo", beta=0.1),
        train_dataset=data,
        processing_class=tokenizer,
    )
    batch = next(iter(theirs.get_train_dataloader()))
    loss_theirs = theirs.compute_loss(theirs.model, batch)
    loss_ours = ours.compute_loss(ours.model, batch)
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-5, atol=1e-6)
    loss_theirs.backward()
    loss_ours.backward()
    for (name, a), (_, b) in zip(
        theirs.model.named_parameters(), ours.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("loss", ["tbpo-a", "tbpo-q"])
@pytest.mark.parametrize("lora", [False, True])
def test_tbpo_trains_with_and_without_lora_and_loads_back(loss, lora, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from tokenratio.baseline import StateBaselineHead
    from tokenratio.integrations.trl import TBPOTrainer

    model, tokenizer = load(tiny_model_dir)
    kwargs = {"ref_model": copy.deepcopy(model)}
    if lora:
        from peft import LoraConfig

        kwargs = {
            "ref_model": None,
            "peft_config": LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
            ),
        }
    trainer = TBPOTrainer(
        model=model,
        args=config(tmp_path, tokenratio_loss=loss),
        train_dataset=hh_dataset(),
        processing_class=tokenizer,
        **kwargs,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert "rewards/accuracy" in logged[-1]
    trainer.save_model(str(tmp_path / "saved"))
    if lora:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(tmp_path / "merged")
        AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    else:
        AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    if loss == "tbpo-q":
        head = StateBaselineHead.from_pretrained(tmp_path / "saved")
        assert any(not torch.equal(p, torch.zeros_like(p)) for p in head.parameters())


DDP_SCRIPT = textwrap.dedent(
    """
    import copy, json, pathlib, sys
    sys.path[:0] = [sys.argv[3], str(pathlib.Path(sys.argv[3]).parent)]  # test_trl.py, tiny.py
    from test_trl import config, hh_dataset, load
    from tokenratio.integrations.trl import TBPOTrainer
    import pathlib
    model, tokenizer = load(sys.argv[1])
    trainer = TBPOTrainer(model=model, ref_model=copy.deepcopy(model),
                          args=config(pathlib.Path(sys.argv[2]), tokenratio_loss="tbpo-q"),
                          train_dataset=hh_dataset(), processing_class=tokenizer)
    trainer.train()
    if trainer.accelerator.is_main_process:
        print(json.dumps({"world": trainer.accelerator.num_processes,
                          "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}))
    # both processes tear the gloo group down together, as tokenratio's trainer does: one that
    # exits while the other still prints aborted once ("terminate called without an active
    # exception", a clean-clone CI run)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()
    """
)


def test_two_cpu_processes(tiny_model_dir, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    tests = str(__import__("pathlib").Path(__file__).parent)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(script),
            str(tiny_model_dir),
            str(tmp_path / "out"),
            tests,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert report["world"] == 2 and len(report["losses"]) == 3


def test_missing_trl_names_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['trl'] = None\n"
        "import tokenratio\n"
        "try:\n    import tokenratio.integrations.trl\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'tokenratio[trl]'" in out.stdout


def test_tisdpo_is_refused_before_any_setup(tiny_model_dir, tmp_path):
    """TRL's batches carry no token weights: say where TIS-DPO is trained instead."""
    from tokenratio.integrations.trl import TBPOTrainer

    model, tokenizer = load(tiny_model_dir)
    with pytest.raises(ValueError, match="tokenratio tisdpo"):
        TBPOTrainer(
            model=model,
            args=config(tmp_path, tokenratio_loss="tisdpo"),
            processing_class=tokenizer,
            train_dataset=hh_dataset(4),
        )


def test_pair_weights_ride_through_trl_and_weigh_each_pair(tiny_model_dir, tmp_path):
    """A `weight` column reaches compute_loss (TRL would drop it): weights (1, 2, 1) give the
    loss of the middle pair counted twice."""
    from tokenratio.integrations.trl import TBPOTrainer

    model, tokenizer = load(tiny_model_dir)
    data = hh_dataset(24)
    short = [i for i in range(len(data)) if len(tokenizer(data[i]["prompt"])["input_ids"]) < 200]
    data = data.select(short[:3])  # TRL drops the pairs whose prompt fills max_length

    def trainer(dataset, name):
        return TBPOTrainer(
            model=copy.deepcopy(model),
            ref_model=copy.deepcopy(model),
            args=config(tmp_path / name, tokenratio_loss="dpo", per_device_train_batch_size=4),
            train_dataset=dataset,
            processing_class=tokenizer,
        )

    def loss_of(ours):
        rows = [ours.train_dataset[i] for i in range(len(ours.train_dataset))]
        batch = ours.data_collator(rows)
        return ours.compute_loss(ours.model, batch), batch

    from datasets import concatenate_datasets

    weighted = trainer(data.add_column("weight", [1.0, 2.0, 1.0]), "weighted")
    twice = trainer(concatenate_datasets([data.select([0, 1, 1, 2])]), "twice")
    loss, batch = loss_of(weighted)
    assert batch["pair_weights"].tolist() == [1.0, 2.0, 1.0]
    torch.testing.assert_close(loss, loss_of(twice)[0], rtol=1e-5, atol=1e-7)
    assert "pair_weights" not in loss_of(trainer(data, "plain"))[1]
