"""End-to-end tests of the three tools on SmolLM2-135M, against figures computed with llama.cpp
(tests/data/llamacpp-reference.json, written by bench/make_reference.py)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from conftest import ROOT, run_tool

REF = json.loads((ROOT / "tests/data/llamacpp-reference.json").read_text())
HEAD = ROOT / "tests/data/wikitext-2-test-head.txt"


def ppl_of(stdout: str) -> float:
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", stdout)
    assert m, stdout
    return float(m.group(1))


def generate(bin_dir, model, prompt, n=64, extra=(), env=None):
    r = run_tool([bin_dir / "moqae-cli", "-m", model, "-p", prompt, "-n", n, "--temp", "0", "-c", 512, *extra], env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(prompt)
    return r


@pytest.mark.parametrize("prompt", list(REF["greedy_64"]))
def test_greedy_follows_llamacpp(bin_dir, smollm2, prompt):
    """llama.cpp's 64 greedy tokens, teacher-forced through moqae: our argmax agrees at >= 90% of the
    positions, and where it does not, llama.cpp's token is a near tie in our logits (within 0.5 of our
    best). Exact 64-token identity is not a fair test: with 8-bit activations a logit moves by ~0.2
    whenever any upstream sum changes its rounding order (llama.cpp's and ours differ), which flips
    near ties and sends the two continuations apart from there."""
    moqae_cpp = pytest.importorskip("moqae_cpp", reason="the moqae_cpp package is not installed")
    import numpy as np

    ref = REF["greedy_64"][prompt]["tokens"]
    with moqae_cpp.Llama(smollm2, n_ctx=512, n_threads=2, logits_all=True) as llm:
        toks = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        llm.eval(toks + ref)
        logits = np.asarray(llm.scores[len(toks) - 1:len(toks) + len(ref) - 1])
    ours = logits.argmax(axis=1)
    agree = ours == np.asarray(ref)
    assert agree.mean() >= 0.9, agree.mean()
    gaps = logits.max(axis=1) - logits[np.arange(len(ref)), ref]
    assert gaps[~agree].max(initial=0.0) < 0.5, gaps[~agree]


def test_cli_greedy_equals_python_greedy(bin_dir, smollm2):
    moqae_cpp = pytest.importorskip("moqae_cpp", reason="the moqae_cpp package is not installed")
    prompt = "The capital of France is"
    r = generate(bin_dir, smollm2, prompt, n=32, extra=["-t", "2"])
    with moqae_cpp.Llama(smollm2, n_ctx=512, n_threads=2) as llm:
        out = llm(prompt, max_tokens=32, temperature=0.0)["choices"][0]["text"]
    assert r.stdout[len(prompt):].rstrip("\n") == out.rstrip("\n")


def test_cli_reports_speed_and_kv(bin_dir, smollm2):
    r = generate(bin_dir, smollm2, "Hello", n=8)
    assert re.search(r"prompt: +\d+ tokens in .* tokens/s", r.stderr)
    assert re.search(r"generation: +\d+ tokens in .* tokens/s", r.stderr)
    m = re.search(r"kv cache: +(\d+)/512 tokens, fp16, chunks fp16 (\d+) int8 0 int4 0 int2 0, .* bits, "
                  r"([0-9.]+) MiB used, ([0-9.]+) MiB reserved", r.stderr)
    assert m, r.stderr
    n_tok = int(m.group(1))
    assert int(m.group(2)) == n_tok // 32
    # SmolLM2: 30 layers x 2 (K, V) x 3 KV heads x 64 dims x 2 bytes per token, for 512 tokens
    assert float(m.group(4)) >= 512 * 30 * 2 * 3 * 64 * 2 / 2**20


def test_threads_do_not_change_greedy_output(bin_dir, smollm2):
    a = generate(bin_dir, smollm2, "Once upon a time", n=24, extra=["-t", "1"])
    b = generate(bin_dir, smollm2, "Once upon a time", n=24, extra=["-t", "2"])
    assert a.stdout == b.stdout


def test_seeded_sampling_is_reproducible(bin_dir, smollm2):
    args = [bin_dir / "moqae-cli", "-m", smollm2, "-p", "Once upon a time", "-n", 24, "--temp", "1.0", "-c", 256]
    a = run_tool(args + ["-s", 5])
    b = run_tool(args + ["-s", 5])
    c = run_tool(args + ["-s", 6])
    assert a.returncode == b.returncode == c.returncode == 0
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_perplexity_matches_llamacpp(bin_dir, smollm2):
    r = run_tool([bin_dir / "moqae-perplexity", "-m", smollm2, "-f", HEAD, "-c", 128, "--chunks", 16])
    assert r.returncode == 0, r.stderr
    ours, ref = ppl_of(r.stdout), REF["ppl_head_c128_chunks16"]
    assert abs(ours / ref - 1) < 0.005, (ours, ref)


def test_perplexity_independent_of_micro_batch(bin_dir, smollm2):
    vals = []
    for b in (16, 48, 128):
        r = run_tool([bin_dir / "moqae-perplexity", "-m", smollm2, "-f", HEAD, "-c", 128, "--chunks", 4, "-b", b])
        assert r.returncode == 0, r.stderr
        vals.append(ppl_of(r.stdout))
    assert max(vals) - min(vals) < 1e-3 * vals[0], vals


def test_prompt_longer_than_context_is_an_error(bin_dir, smollm2):
    r = run_tool([bin_dir / "moqae-cli", "-m", smollm2, "-f", HEAD, "-c", 64, "-n", 4])
    assert r.returncode == 1
    assert "context holds 64" in r.stderr


def test_generation_stops_when_context_is_full(bin_dir, smollm2):
    r = run_tool([bin_dir / "moqae-cli", "-m", smollm2, "-p", "Count: 1, 2, 3,", "-n", -1, "-c", 32, "--temp", 0])
    assert r.returncode == 0, r.stderr
    assert "context full" in r.stderr
    assert "kv cache:     32/32 tokens" in r.stderr or re.search(r"kv cache: +32/32 tokens", r.stderr)


def test_bench_prints_table(bin_dir, smollm2):
    r = run_tool([bin_dir / "moqae-bench", "-m", smollm2, "-p", 32, "-n", 4, "-r", 1, "-d", 16])
    assert r.returncode == 0, r.stderr
    assert re.search(r"\| pp32 @ d16 \| [0-9.]+ \(min", r.stdout), r.stdout
    assert re.search(r"\| tg4 @ d16 \| [0-9.]+ \(min", r.stdout), r.stdout


@pytest.mark.parametrize("args,msg", [
    (["-n", "abc"], "expects an integer"),
    (["--temp", "nan"], "expects a number"),
    (["--bogus"], "unknown option"),
    (["-p", "x", "-f", "y"], "either -p or -f"),
])
def test_bad_options(bin_dir, smollm2, args, msg):
    r = run_tool([bin_dir / "moqae-cli", "-m", smollm2, *args])
    assert r.returncode == 1
    assert msg in r.stderr


def test_perplexity_needs_enough_text(bin_dir, smollm2, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    r = run_tool([bin_dir / "moqae-perplexity", "-m", smollm2, "-f", short, "-c", 128])
    assert r.returncode == 1
    assert "need at least 256 tokens" in r.stderr
