#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent machine (device README: 15 minutes in all).
#   bash scripts/gpu_check.sh OUT_DIR
# Needs torch with CUDA, transformers, accelerate and peft (the device image has them), and TRL for
# the perf rows against TRL (carry its wheel). Each part has its own timeout and writes into OUT_DIR
# as it finishes, so a part that runs long still leaves the others' results.
#   1. FSDP (configs/accelerate/fsdp.yaml settings, 1 process, fp32) and DeepSpeed ZeRO-3
#      (configs/accelerate/deepspeed_zero3.yaml, 1 process, fp32, no fused head; skipped where
#      DeepSpeed is not installed: carry it) against a plain 1-process run of the same config on a
#      tiny model: the same loss curve, through Accelerate's own GPU wrapping (on CPUs tokenratio
#      switches it on itself: tests/test_sharded.py).
#   2. tokenratio perf --preset gpu: random-weight SmolLM2-135M and Llama-3.2-1B shapes, bf16
#      autocast over fp32 weights (as `tokenratio train`), HH lengths; our dpo/tbpo rows, the
#      ablation rows, TRL (carry its wheel) and the one-process TBPO step ratios (--ab).
# The device has no ../shared: copy the HH file into an ignored folder, carry it and point
# TOKENRATIO_HH_PATH at it (tests/tiny.py reads it too).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?give an output directory}
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)" || {
  echo "gpu_check: no CUDA device" | tee "$OUT/gpu_check.txt"; exit 2; }
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="src:tests:${PYTHONPATH:-}"
export TOKENRATIO_HH_PATH=${TOKENRATIO_HH_PATH:-../shared/data/hh-rlhf/harmless-base-test.jsonl.gz}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt"

python - "$OUT" <<'PY'
import sys
from pathlib import Path
from tiny import make_tiny_model, write_hh_jsonl
out = Path(sys.argv[1])
make_tiny_model(out / "tiny"); write_hh_jsonl(out / "hh.jsonl", 96)
PY
COMMON=(--set model.name_or_path="$OUT/tiny" --set data.path="$OUT/hh.jsonl" --set data.on_invalid=skip
        --set data.max_length=256 --set data.max_prompt_length=128 --set loss.name=tbpo-q
        --set train.optimizer=adamw --set train.lr=1e-3 --set train.max_steps=6 --set train.batch_size=4
        --no-progress)
timeout 180 python -m tokenratio.cli train "${COMMON[@]}" --set train.output_dir="$OUT/plain" \
  > "$OUT/plain.log" 2>&1
timeout 240 accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 \
  --mixed_precision no -m tokenratio.cli train "${COMMON[@]}" --set train.output_dir="$OUT/fsdp" \
  > "$OUT/fsdp.log" 2>&1
if python -c "import deepspeed" 2>/dev/null; then
  timeout 240 accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes 1 \
    --mixed_precision no -m tokenratio.cli train "${COMMON[@]}" --set train.fused_head=false \
    --set train.output_dir="$OUT/zero3" > "$OUT/zero3.log" 2>&1
fi
python - "$OUT" <<'PY' | tee "$OUT/sharded_check.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def losses(run):
    path = out / run / "metrics.jsonl"
    return [json.loads(l).get("loss") for l in path.read_text().splitlines()] if path.exists() else None
plain = losses("plain")
for run in ("fsdp", "zero3"):
    got = losses(run)
    same = plain and got and all(abs((a or 0) - (b or 0)) < 1e-4 for a, b in zip(plain, got))
    print(f"{run} vs plain: {'the same loss curve' if same else 'DIFFERENT or failed'}\nplain {plain}\n{run} {got}")
PY

timeout 570 python -m tokenratio.cli perf --preset gpu --data "$TOKENRATIO_HH_PATH" --out "$OUT/perf" \
  > "$OUT/perf.log" 2>&1
tail -40 "$OUT/perf.log"
