"""CUDA backend (issue 7): the GPU path against the CPU path. Skipped unless the CUDA build's
helper (tests/tools/cuda-parity.c, in $MOQAE_CUDA_BIN_DIR or build-cuda/) finds a device; CI builds
the CUDA sources without a GPU, so there these tests skip, and they run on an H100
(scripts/cuda-check.sh). The helper compares the GPU KV encoder's bytes with kv-codec.c, the
logits of every fixed KV policy (prefill in micro-batches and decode steps), and 64 greedy tokens
on 3 prompts; docs/RESULTS.md has its output."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import ROOT, no_crash, run_tool



def _cuda_bin() -> Path:
    return Path(os.environ.get("MOQAE_CUDA_BIN_DIR", ROOT / "build-cuda"))


@pytest.fixture(scope="module")
def parity_tool() -> Path:
    tool = _cuda_bin() / "cuda-parity"
    if not tool.exists():
        pytest.skip(f"no CUDA build at {tool.parent} (cmake -DMOQAE_CUDA=ON -B build-cuda)")
    r = run_tool([tool, "--probe"], timeout=60)
    if r.returncode == 77:
        pytest.skip("no CUDA device")
    return tool


@pytest.mark.xfail(strict=False, reason="issue 7, open: the GPU codecs implement kv-codec.h before the rotated/"
                   "outlier codec landed (codec bytes differ for int8/int4/int2), and fp16-KV logits differ from the "
                   "CPU's by nrmse 0.10 on SmolLM2 (greedy 26/13/47 of 64 tokens): docs/RESULTS.md, Issue 7")
def test_gpu_matches_cpu_on_smollm2(parity_tool: Path, smollm2: str) -> None:
    r = run_tool([parity_tool, smollm2], timeout=900)
    no_crash(r)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "codec bytes: identical" in r.stdout
    assert r.stdout.strip().endswith("PASS")


def test_partial_offload_is_a_clear_error(smollm2: str) -> None:
    cli = _cuda_bin() / "moqae-cli"
    if not cli.exists() or run_tool([_cuda_bin() / "cuda-parity", "--probe"], timeout=60).returncode == 77:
        pytest.skip("no CUDA build or device")
    r = run_tool([cli, "-m", smollm2, "-ngl", "5", "-p", "hi", "-n", "1"], timeout=120)
    no_crash(r)
    assert r.returncode == 1 and "partial offload" in r.stderr
