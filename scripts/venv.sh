#!/usr/bin/env bash
# Create .venv (if missing) and install the given requirement files into it. Prints nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
if [ "$#" -gt 0 ]; then
    args=()
    for f in "$@"; do args+=(-r "$f"); done
    .venv/bin/python -m pip install -q "${args[@]}"
fi
