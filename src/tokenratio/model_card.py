"""final/README.md: the model card a Hugging Face user expects beside the weights (TRL writes one at
every checkpoint): YAML front matter (base model, library, tags, dataset) through huggingface_hub's
ModelCardData, then the method and its options, the training settings, the held-out metrics with
their intervals, the exact command and the papers to cite."""

CITATIONS = {
    "tbpo": """@inproceedings{nguyen2026tokenratio,
  title  = {TokenRatio: Principled Token-Level Preference Optimization via Ratio Matching},
  author = {Nguyen and Nguyen and Ngo Van and Nguyen and Doan and Le},
  booktitle = {International Conference on Machine Learning (ICML)},
  year   = {2026},
  note   = {arXiv:2605.12288}
}""",
    "dpo": """@inproceedings{rafailov2023dpo,
  title  = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author = {Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Ermon, Stefano and
            Manning, Christopher D. and Finn, Chelsea},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year   = {2023},
  note   = {arXiv:2305.18290}
}""",
}


def render(cfg, metrics: dict, interval: tuple[float, float] | None, command=None) -> str:
    """The card's text. `metrics`: the final held-out evaluation (eval_* keys); `interval`: the
    95% Wilson interval of its reward accuracy; `command`: the command line that trained it."""
    from huggingface_hub import ModelCardData

    loss = cfg.loss
    tags = ["tokenratio", "preference-optimization", loss.name]
    tags += ["lora"] * (cfg.model.lora_r > 0)
    data = ModelCardData(
        base_model=cfg.model.name_or_path,
        library_name="transformers",
        tags=tags,
        datasets=[cfg.data.path],
        model_name=cfg.train.output_dir.rstrip("/").rsplit("/", 1)[-1],
    )
    return "\n".join(
        [
            f"---\n{data.to_yaml()}\n---",
            f"# {cfg.train.output_dir}",
            "",
            f"{cfg.model.name_or_path} preference-optimized with **{loss.name}** "
            f"(beta {loss.beta:g}{_options(loss.options)}) on `{cfg.data.path}` with "
            "tokenratio's `tokenratio train` (TBPO: arXiv 2605.12288).",
            "",
            "## Training",
            "",
            _settings(cfg),
            "",
            "## Held-out evaluation",
            "",
            _heldout(metrics, interval),
            "",
            "## Reproduce",
            "",
            f"```bash\n{command}\n```" if command else "`tokenratio train` (by `tokenratio study`)",
            "",
            "Every setting is in `config.json` of the run directory (one level up).",
            "",
            "## Citation",
            "",
            "```bibtex\n" + "\n\n".join(CITATIONS.values()) + "\n```",
            "",
        ]
    )


def _options(options: dict) -> str:
    return "".join(f", {key} {value}" for key, value in sorted(options.items()))


def _settings(cfg) -> str:
    t, m = cfg.train, cfg.model
    rows = [
        ("optimizer", f"{t.optimizer}, lr {t.lr:g}, {t.schedule} schedule"),
        ("steps", f"{t.max_steps} (max_steps)" if t.max_steps else f"{t.epochs} epoch(s)"),
        ("batch", f"{t.batch_size} pairs per process x {t.grad_accumulation} accumulation"),
        ("precision", t.mixed_precision),
        ("seed", str(t.seed)),
        ("max length", f"{cfg.data.max_length} (prompt {cfg.data.max_prompt_length})"),
    ]
    if m.lora_r:
        where = f", last {m.lora_last_layers} layers" if m.lora_last_layers else ""
        rows.append(("LoRA", f"r {m.lora_r}, alpha {m.lora_alpha}{where}"))
    return "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _heldout(metrics: dict, interval) -> str:
    if "eval_reward_accuracy" not in metrics:
        return "No held-out evaluation was logged."
    lines = [f"Implicit-reward accuracy **{metrics['eval_reward_accuracy']:.3f}**"]
    if interval:
        lines[0] += f" (95% Wilson interval {interval[0]:.3f}-{interval[1]:.3f})"
    pairs = metrics.get("heldout_pairs")
    lines[0] += f" on {pairs} held-out pairs." if pairs else " on the held-out pairs."
    others = {
        k: v for k, v in metrics.items() if k.startswith("eval_") and k != "eval_reward_accuracy"
    }
    lines += [
        f"- {key.removeprefix('eval_')}: {value:.4f}" for key, value in sorted(others.items())
    ]
    return "\n".join(lines)
