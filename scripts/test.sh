#!/usr/bin/env bash
# Set up, then run the whole test suite (tiny models for invariants, packaged models for smoke runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
