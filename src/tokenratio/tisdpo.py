"""TIS-DPO's token weights (Liu et al., "TIS-DPO", arXiv 2410.04350) and `tokenratio tisdpo`.

TIS-DPO weights every token's log-ratio in the DPO objective (`losses.tisdpo_loss`). The weights come
from two contrastive models: in the paper's best variant, one trained with DPO on the data (pi+)
and one trained with DPO on the same data with the preferences flipped (pi-). For each response token,
the contrast log pi+(y_t|s_t) - log pi-(y_t|s_t) estimates its reward (the authors' code stores
exactly this difference per token), and the paper turns it into a weight

    w_t = k * exp(mu * clamp(contrast_t, L, U)),   mu = +1 on chosen, -1 on rejected,

so high-reward tokens of the chosen response and low-reward tokens of the rejected one count most.
L, U and k are hyperparameters (`[tisdpo] lower, upper, scale`; defaults -1, 1, 1 are ours: the
paper's values could not be checked where this was written).

The pipeline, each stage skipped when its output is already there (a crashed run resumes):
    1. train pi+ (loss dpo) and pi- (loss dpo, data.swap_preferences) with the run's config,
       unless [tisdpo] positive_model / negative_model name existing models;
    2. score the data once: output_dir/weights/train.jsonl (and heldout.jsonl) hold every valid
       record with chosen_weight/rejected_weight and the raw chosen_contrast/rejected_contrast;
    3. train TIS-DPO on the scored file (into output_dir; skipped when output_dir/final is complete).
"""

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from tokenratio import atomic
from tokenratio.losses import LOSSES, importance_weights
from tokenratio.rundir import is_complete
from tokenratio.scoring import batch_contrasts, batches


def token_contrasts(positive, negative, dataset, pad_id: int, batch_size: int, progress=True):
    """log pi+(y_t|s_t) - log pi-(y_t|s_t) of every response token of every tokenized pair.

    Returns:
        A list, one (chosen contrasts, rejected contrasts) pair of float lists per row of `dataset`.
    """
    out = []
    batch_iter = batches(dataset, pad_id, batch_size)
    for batch, contrast in batch_contrasts(positive, negative, batch_iter, progress):
        contrast, lengths = contrast.cpu(), (batch.labels >= 0).sum(-1).tolist()  # (2B, T)
        B = batch.num_pairs
        for i in range(B):
            out.append(
                (contrast[i, : lengths[i]].tolist(), contrast[B + i, : lengths[B + i]].tolist())
            )
    return out


def scored_records(raw, tokenized, contrasts, tcfg) -> list[dict]:
    """The valid source records with their weights and contrasts added (JSON-ready)."""
    records = []
    for row_index, (chosen, rejected) in enumerate(contrasts):
        record = dict(raw.dataset[int(tokenized[row_index]["record"])])
        for name, values in (("chosen", chosen), ("rejected", rejected)):
            contrast = torch.tensor(values, dtype=torch.float64)
            weights = importance_weights(
                contrast,
                chosen=name == "chosen",
                lower=tcfg.lower,
                upper=tcfg.upper,
                scale=tcfg.scale,
            )
            record[f"{name}_weight"] = [round(w, 6) for w in weights.tolist()]
            record[f"{name}_contrast"] = [round(c, 6) for c in values]
        records.append(record)
    return records


def _contrast_models(cfg, out: Path, progress: bool) -> tuple[str, str]:
    """Paths of pi+ and pi-: the configured ones, or trained here (skipped when already trained)."""
    from tokenratio.config import with_overrides
    from tokenratio.trainer import train

    paths = {}
    for side, swap, given in (
        ("positive", False, cfg.tisdpo.positive_model),
        ("negative", True, cfg.tisdpo.negative_model),
    ):
        if given:
            paths[side] = given
            continue
        run_dir = out / f"contrast-{side}"
        paths[side] = str(run_dir / "final")
        if is_complete(run_dir / "final"):
            print(f"tisdpo: {side} contrast model found in {paths[side]}")
            continue
        print(f"tisdpo: training the {side} contrast model (dpo, swap_preferences={swap})")
        contrast_cfg = with_overrides(
            cfg,
            loss={"name": "dpo", "options": {}},
            data={"swap_preferences": swap},
            train={"output_dir": str(run_dir)},
        )
        train(contrast_cfg, resume=True, progress=progress)
    return paths["positive"], paths["negative"]


def score_file(cfg, data_path: str, models, tokenizer, target: Path, meta: dict, progress: bool):
    """Score one data file into `target` (skipped when it exists with the same settings)."""
    from tokenratio.data import load_raw, tokenize_dataset

    meta_path = target.with_suffix(".meta.json")  # written after the scores: both or neither
    if (
        target.exists()
        and meta_path.exists()
        and json.loads(meta_path.read_text()).get("settings") == meta
    ):
        print(f"tisdpo: weights found in {target}")
        return
    raw = load_raw(data_path, cfg.data.split, cfg.data.limit, cfg.data.on_invalid, cfg.data.format)
    tokenized, report = tokenize_dataset(raw, tokenizer, replace(cfg.data, swap_preferences=False))
    contrasts = token_contrasts(
        *models, tokenized, tokenizer.pad_token_id, cfg.tisdpo.score_batch_size, progress
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_jsonl(target, scored_records(raw, tokenized, contrasts, cfg.tisdpo))
    atomic.write_json(meta_path, {"settings": meta, "report": report})
    print(f"tisdpo: scored {len(contrasts)} pairs of {data_path} into {target} ({report})")


def run_tisdpo(cfg, *, score_only: bool = False, progress: bool = True) -> dict:
    """The whole pipeline for a Config; returns the TIS-DPO run's final metrics (or the scored
    files' paths with `score_only`)."""
    from tokenratio.config import with_overrides
    from tokenratio.modeling import default_device, load_pretrained, load_tokenizer
    from tokenratio.trainer import TrainingError, train

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainingError(
            "tokenratio tisdpo runs in one process; under several, run its steps separately: "
            "`train --set loss.name=dpo` (and with data.swap_preferences=true), `tisdpo --positive "
            "P --negative N --score-only`, then `train --set loss.name=tisdpo --set data.path=...`"
        )
    out = Path(cfg.train.output_dir)
    positive, negative = _contrast_models(cfg, out, progress)
    device = default_device(cfg.train.cpu)
    models = [load_pretrained(path, device, cfg.model.dtype)[0] for path in (positive, negative)]
    tokenizer = load_tokenizer(cfg.model)
    meta = {
        "positive": positive,
        "negative": negative,
        "tokenizer": cfg.model.name_or_path,
        "tisdpo": asdict(cfg.tisdpo),
        "data": {k: v for k, v in asdict(cfg.data).items() if k != "swap_preferences"},
    }
    scored = {"path": out / "weights" / "train.jsonl", "heldout_path": None}
    score_file(cfg, cfg.data.path, models, tokenizer, scored["path"], meta, progress)
    if cfg.data.heldout_path:
        scored["heldout_path"] = out / "weights" / "heldout.jsonl"
        score_file(
            cfg, cfg.data.heldout_path, models, tokenizer, scored["heldout_path"], meta, progress
        )
    del models
    scored = {k: v and str(v) for k, v in scored.items()}
    if score_only:
        return scored
    if is_complete(out / "final"):
        print(
            f"tisdpo: {out}/final is complete: nothing to do (pick another train.output_dir to retrain)"
        )
        return {"step": None, "final": str(out / "final")}
    # The config's loss options carry over when they are TIS-DPO's own (a weighted loss).
    options = dict(cfg.loss.options) if LOSSES[cfg.loss.name].weights else {}
    final_cfg = with_overrides(
        cfg,
        loss={"name": "tisdpo", "options": options},
        data={**scored, "limit": None, "swap_preferences": False},
    )
    return train(final_cfg, resume=True, progress=progress)
