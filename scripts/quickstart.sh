#!/usr/bin/env bash
# Set up, then fine-tune MiniLM-L6 on the packaged Rotten Tomatoes snippets and print the dev metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
sparsetune train recipes/quickstart.yaml --resume "$@"
