"""The reference cache at scale: `tokenratio train` on N synthetic pairs without the cache, with a
cold one (scored then) and a warm one (read), each timed as a whole process; plus the cache's
size against the floats it holds. A tiny random-weight Llama, so the runs time the cache, not
the model.

    python scripts/ref_cache_scale.py --pairs 50000 --out /tmp/ref-cache-scale
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def prepare(out: Path, pairs: int) -> tuple[Path, Path]:
    from tokenratio.perf.models import build_model, synthetic_pairs, word_tokenizer

    model_dir, data = out / "model", out / "pairs.jsonl"
    if not model_dir.exists():
        model = build_model("tiny")
        model.save_pretrained(model_dir)
        word_tokenizer(model.config.vocab_size).save_pretrained(model_dir)
    if not data.exists():
        rows = synthetic_pairs(pairs, 2048, prompt_len=24, response_len=16)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def timed_train(model_dir: Path, data: Path, out: Path, name: str, cache: bool) -> dict:
    settings = {
        "model.name_or_path": str(model_dir),
        "data.path": str(data),
        "data.heldout_fraction": 0.01,
        "loss.name": "dpo",
        "train.output_dir": str(out / "runs" / name),
        "train.max_steps": 2,
        "train.batch_size": 8,
        "train.eval_batch_size": 64,
        "train.ref_cache": cache,
    }
    args = [f"{k}={json.dumps(v) if isinstance(v, str | bool) else v}" for k, v in settings.items()]
    cmd = [sys.executable, "-m", "tokenratio.cli", "train", "--no-progress", "--overwrite"]
    cmd += [a for s in args for a in ("--set", s)]
    env = {**os.environ, "TOKENRATIO_REF_CACHE_DIR": str(out / "cache")}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("reference")]
    return {"run": name, "seconds": round(time.perf_counter() - start, 1), "said": lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=50000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir, data = prepare(args.out, args.pairs)
    runs = [
        timed_train(model_dir, data, args.out, "no-cache", False),
        timed_train(model_dir, data, args.out, "cold-cache", True),
        timed_train(model_dir, data, args.out, "warm-cache", True),
    ]
    files = list((args.out / "cache").rglob("shard-*.safetensors"))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tokens = sum(len(r["chosen"].split()) + len(r["rejected"].split()) + 2 for r in rows)
    report = {
        "pairs": args.pairs,
        "runs": runs,
        "cache_bytes": sum(f.stat().st_size for f in files),
        "cache_files": len(files),
        "float_bytes": 4 * tokens,  # one float32 per response token (EOS included)
    }
    print(json.dumps(report, indent=1))
    (args.out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
