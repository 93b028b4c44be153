#!/usr/bin/env bash
# Regenerates requirements/ci.txt, the lock CI installs from (scripts/install.sh): a new venv gets
# what pip resolves today within pyproject's ranges, and every installed version is written down.
# Run it, then `bash .ci/run` in a new venv on a clean clone, and commit the lock with the result.
#   bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
bash scripts/install.sh --latest
{
  echo "# The versions CI and the test suite run with: written by scripts/lock.sh on $(date -u +%F),"
  echo "# $(python --version), $(uname -m). Install with: bash scripts/install.sh"
  echo "# (torch is pinned there: 2.13.0, the CPU build; pip itself is left out.)"
  python -m pip freeze --all --exclude-editable | grep -viE '^(pip|torch|tokenratio)=='
} > requirements/ci.txt.new
mv requirements/ci.txt.new requirements/ci.txt
rm -rf "$(dirname "$venv")"
echo "wrote requirements/ci.txt ($(grep -vc '^#' requirements/ci.txt) packages)"
