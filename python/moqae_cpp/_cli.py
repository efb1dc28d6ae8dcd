# _cli.py — console-script entry points (moqae-cli, moqae-perplexity, moqae-bench). The tools are
# C programs installed inside the package (moqae_cpp/bin, RPATH to moqae_cpp/lib); each entry point
# replaces the Python process with the bundled binary, so arguments, signals and the exit status are
# the tool's own. The binaries are found next to the compiled module, which is also where an
# editable install puts them.
from __future__ import annotations

import os
import sys
from pathlib import Path


def tool_path(name: str) -> Path:
    """Path of a bundled tool binary."""
    import importlib.util

    spec = importlib.util.find_spec("moqae_cpp._native")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("moqae_cpp._native is not built: install the package with pip")
    return Path(spec.origin).parent / "bin" / name


def _exec(name: str) -> int:
    path = tool_path(name)
    if not os.access(path, os.X_OK):
        sys.stderr.write(f"error: {name} is not installed at {path}; reinstall moqae_cpp (pip install .)\n")
        return 127
    os.execv(path, [name, *sys.argv[1:]])
    return 127  # not reached


def cli() -> int:
    return _exec("moqae-cli")


def perplexity() -> int:
    return _exec("moqae-perplexity")


def bench() -> int:
    return _exec("moqae-bench")
