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


def test_gpu_encoder_emulated_matches_cpu_codec() -> None:
    """The GPU encoder's phases, run on the CPU, give kv-codec.c's bytes (no device needed)."""
    tool = _cuda_bin() / "cuda-parity"
    if not tool.exists():
        pytest.skip(f"no CUDA build at {tool.parent} (cmake -DMOQAE_CUDA=ON -B build-cuda)")
    r = run_tool([tool, "--emulate"], timeout=300)
    no_crash(r)
    assert r.returncode == 0 and "identical" in r.stdout, r.stdout[-2000:]


@pytest.fixture(scope="module")
def smollm2_parity(parity_tool: Path, smollm2: str) -> str:
    router = ROOT / "models" / "smollm2-135m-moqae-balanced.gguf"
    r = run_tool([parity_tool, smollm2, "--router", str(router)], timeout=900)
    no_crash(r)
    return r.stdout


def test_gpu_codecs_attention_router_match_cpu(smollm2_parity: str) -> None:
    out = smollm2_parity
    assert "codec bytes: identical" in out, out[-4000:]
    attention = [line for line in out.splitlines() if line.startswith("attention ")]
    assert len(attention) == 16 and all(line.endswith("ok") for line in attention), "\n".join(attention)
    assert "router decisions:" in out and "0 differ" in out, out[-4000:]
    for kv in ("fp16", "int8", "int4", "sink+int4", "router"):
        line = next(line for line in out.splitlines() if line.startswith(f"kv {kv:<9}:"))
        assert line.endswith("ok"), line


@pytest.mark.xfail(strict=False, reason="issue 7: greedy output is not identical for 64 tokens (SmolLM2 fp16 KV: 5/13/47 "
                   "tokens), and int2 logits differ by nrmse 0.07-0.08. The CPU's own ISA variants disagree as much "
                   "(scalar vs AVX-512 logits nrmse 0.040, greedy diverging within a few tokens): 8-bit activations "
                   "turn 1-ulp summation-order differences into whole quantization steps. docs/RESULTS.md, Issue 7")
def test_gpu_matches_cpu_on_smollm2(smollm2_parity: str) -> None:
    assert smollm2_parity.strip().endswith("PASS"), smollm2_parity[-4000:]


def test_partial_offload_is_a_clear_error(smollm2: str) -> None:
    cli = _cuda_bin() / "moqae-cli"
    if not cli.exists() or run_tool([_cuda_bin() / "cuda-parity", "--probe"], timeout=60).returncode == 77:
        pytest.skip("no CUDA build or device")
    r = run_tool([cli, "-m", smollm2, "-ngl", "5", "-p", "hi", "-n", "1"], timeout=120)
    no_crash(r)
    assert r.returncode == 1 and "partial offload" in r.stderr
