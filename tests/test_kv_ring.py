"""The mixed-bit KV ring through the tools and the Python API on SmolLM2: every fixed policy runs and
reports its statistics, results do not depend on the prompt micro-batch, fewer bits cost perplexity
in order, and each overflow policy does what it promises when a generation runs past the cache."""
from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import ROOT, run_tool

HEAD = ROOT / "tests/data/wikitext-2-test-head.txt"
POLICIES = ["fp16", "int8", "int4", "int2", "sink+int8", "sink+int4", "sink+int2"]
STATS = re.compile(r"kv cache: +(\d+)/(\d+) tokens, (\S+), chunks fp16 (\d+) int8 (\d+) int4 (\d+) int2 (\d+), "
                   r"([0-9.]+) nominal / ([0-9.]+) effective bits, ([0-9.]+) MiB used, ([0-9.]+) MiB reserved")


def ppl(bin_dir, model, kv, b=128, chunks=4, c=128, extra=()):
    r = run_tool([bin_dir / "moqae-perplexity", "-m", model, "-f", HEAD, "-c", c, "--chunks", chunks, "-b", b,
                  "-t", 2, *(["--kv", kv] if kv else []), *extra])
    assert r.returncode == 0, r.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout)
    return float(m.group(1)), STATS.search(r.stderr)


@pytest.fixture(scope="module")
def ppls(bin_dir, smollm2):
    return {kv: ppl(bin_dir, smollm2, kv) for kv in POLICIES}


@pytest.mark.parametrize("kv", POLICIES)
def test_policy_stats(ppls, kv):
    _, st = ppls[kv]
    assert st, kv
    n_tok, n_ctx = int(st.group(1)), int(st.group(2))
    assert n_tok == n_ctx == 128  # the last window, 4 chunks of 32
    counts = dict(zip(["fp16", "int8", "int4", "int2"], map(int, st.group(4, 5, 6, 7))))
    base = kv.split("+")[-1]
    want = {"fp16": 0, "int8": 0, "int4": 0, "int2": 0}
    want[base] += 4
    if kv.startswith("sink+"):
        want[base] -= 1
        want["fp16"] += 1
    assert counts == want
    bits = {"fp16": 16, "int8": 8, "int4": 4, "int2": 2}
    nominal = (sum(bits[k] * n for k, n in counts.items())) / 4
    assert float(st.group(8)) == pytest.approx(nominal, abs=0.01)
    assert float(st.group(9)) >= nominal  # scales and zeros cost something


def test_fewer_bits_cost_perplexity_in_order(ppls):
    p = {k: v[0] for k, v in ppls.items()}
    assert abs(p["int8"] / p["fp16"] - 1) < 0.02  # small sample: this model moves ~1% on f16-level rounding changes
    assert p["int2"] > p["int4"] * 1.05  # INT2 everywhere is clearly worse
    assert p["sink+int2"] < p["int2"]  # the FP16 attention sink helps INT2 most
    assert abs(p["int4"] / p["fp16"] - 1) < 0.05


@pytest.mark.parametrize("kv", ["fp16", "int4", "sink+int2"])
def test_micro_batch_invariance(bin_dir, smollm2, kv):
    vals = [ppl(bin_dir, smollm2, kv, b=b, chunks=2)[0] for b in (32, 48, 128)]
    assert max(vals) - min(vals) < 1e-3 * vals[0], vals


def cli(bin_dir, model, *args):
    return run_tool([bin_dir / "moqae-cli", "-m", model, "-p", "Count: 1, 2, 3,", "--temp", "0", "-t", "2", *args])


def test_overflow_error(bin_dir, smollm2):
    r = cli(bin_dir, smollm2, "-n", 150, "-c", 64, "--kv", "int4", "--kv-overflow", "error")
    assert r.returncode == 0, r.stderr
    assert "context full" in r.stderr
    st = STATS.search(r.stderr)
    assert int(st.group(1)) == 64


def test_overflow_shift_keeps_generating(bin_dir, smollm2):
    r = cli(bin_dir, smollm2, "-n", 150, "-c", 64, "--kv", "int4", "--kv-overflow", "shift")
    assert r.returncode == 0, r.stderr
    assert re.search(r"generation: +150 tokens", r.stderr)
    st = STATS.search(r.stderr)
    assert int(st.group(1)) <= 64 + 32  # at most the chunks of n_ctx plus the residual window
    assert int(st.group(6)) == 2  # two int4 chunks held


def test_overflow_demote_fits_a_budget(bin_dir, smollm2):
    # 2 MiB holds two fp16 chunks of SmolLM2 (30 layers x 3 heads x 2 x 32 x 64 x 2 bytes = 0.7 MiB each)
    r = cli(bin_dir, smollm2, "-n", 150, "-c", 256, "--kv", "fp16", "--kv-budget", "2M", "--kv-overflow", "demote")
    assert r.returncode == 0, r.stderr
    assert re.search(r"generation: +150 tokens", r.stderr)
    st = STATS.search(r.stderr)
    counts = list(map(int, st.group(4, 5, 6, 7)))
    assert sum(counts) == 160 // 32 and counts[0] < 5 and counts[1] + counts[2] + counts[3] > 0
    assert float(st.group(10)) <= 2.0 + 0.5  # encoded chunks within the budget (+ the f32 residual window)


def test_budget_error_is_clear(bin_dir, smollm2):
    r = cli(bin_dir, smollm2, "-n", 150, "-c", 256, "--kv", "fp16", "--kv-budget", "2M")
    assert r.returncode == 0, r.stderr
    assert "context full" in r.stderr and "--kv-budget" in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["--kv", "int3"], "unknown KV policy 'int3'"),
    (["--kv-overflow", "drop"], "expects error, shift or demote"),
    (["--kv-chunk", "48"], "must be 32 or 64"),
    (["--kv-budget", "-5"], "expects a positive size"),
    (["--kv-keys", "middle"], "expects pre or post"),
])
def test_bad_kv_options(bin_dir, smollm2, args, msg):
    r = cli(bin_dir, smollm2, "-n", 2, *args)
    assert r.returncode == 1
    assert msg in r.stderr


def test_python_kv_policy(smollm2):
    moqae_cpp = pytest.importorskip("moqae_cpp", reason="the moqae_cpp package is not installed")
    with moqae_cpp.Llama(smollm2, n_ctx=128, n_threads=2, kv="sink+int4") as llm:
        llm.eval(llm.tokenize(HEAD.read_bytes()[:2000])[:100])
        s = llm.kv_cache_stats()
    assert s["n_chunks"] == {"fp16": 1, "int8": 0, "int4": 2, "int2": 0}
    assert s["n_tokens"] == 100


def test_python_kv_keys(smollm2):
    """kv_keys="post" reaches the ring (other records, other logits) at a cost within INT4's own noise."""
    moqae_cpp = pytest.importorskip("moqae_cpp", reason="the moqae_cpp package is not installed")
    toks = None
    logits = {}
    for keys in ("pre", "post", None):
        with moqae_cpp.Llama(smollm2, n_ctx=256, n_threads=2, kv="int4", kv_keys=keys, logits_all=True) as llm:
            toks = toks or llm.tokenize(HEAD.read_bytes()[:3000])[:160]
            llm.eval(toks)
            logits[keys] = np.array(llm.scores[: len(toks)])
    assert np.array_equal(logits[None], logits["pre"])  # the default
    tail = slice(96, len(toks))  # rows that read quantized chunks (3 complete chunks of 32 before them)
    d = logits["post"][tail] - logits["pre"][tail]
    assert np.abs(d).max() > 0  # the option changed the records
    nrmse = np.sqrt((d ** 2).mean()) / logits["pre"][tail].std()
    assert nrmse < 0.1, nrmse
    with pytest.raises(moqae_cpp.InvalidArgumentError, match="kv_keys must be one of"):
        moqae_cpp.Llama(smollm2, n_ctx=64, kv_keys="middle")


def test_c_kv_keys_out_of_range(smollm2):
    """The C API refuses a kv_keys that is not a moqae_kv_keys, naming it (no context is made)."""
    moqae_cpp = pytest.importorskip("moqae_cpp", reason="the moqae_cpp package is not installed")
    from moqae_cpp._native import ffi, lib

    model = moqae_cpp.Model(smollm2)
    try:
        params = ffi.new("struct moqae_context_params *", lib.moqae_context_default_params())
        params.n_ctx, params.kv_keys = 64, 5
        out = ffi.new("struct moqae_context **")
        assert lib.moqae_context_new(model.ptr, params, out) == lib.MOQAE_ERR_INVALID_ARG
        assert out[0] == ffi.NULL
        assert "kv_keys 5 is not a moqae_kv_keys" in ffi.string(lib.moqae_last_error()).decode()
    finally:
        model.close()


def test_budget_is_global_across_layers(bin_dir, smollm2):
    # The compact router decides per layer (most layers INT2, a few INT4). The arena is shared by the
    # layers, so the bytes the INT2 layers leave unused go to the INT4 layers: the ring fills the whole
    # budget before it demotes. With a per-layer share of the budget (budget / n_layer, the old ring) the
    # same run stopped at 2.35 MiB of 2.54 and its PPL was 13.95 instead of 13.44.
    router = ROOT / "models" / "smollm2-135m-moqae-compact.gguf"
    budget_mib = 2600 / 1024
    r = run_tool([bin_dir / "moqae-perplexity", "-m", smollm2, "-f", HEAD, "-c", 512, "--chunks", 1, "-b", 32, "-t", 2,
                  "--router", router, "--kv-budget", "2600K", "--kv-overflow", "demote"])
    assert r.returncode == 0, r.stderr
    st = STATS.search(r.stderr)
    assert int(st.group(1)) == 512
    used = float(st.group(10))  # every chunk complete: no residual window
    assert budget_mib - 0.1 <= used <= budget_mib
    counts = list(map(int, st.group(4, 5, 6, 7)))
    assert counts[0] == 1 and counts[2] >= 1  # the frozen chunk 0, and INT4 records left after demotion


def test_learned_demotion_order_beats_recency(bin_dir, smollm2):
    """The shipped balanced router carries learned per-layer demotion weights (docs/RESULTS.md, issue 6
    session 6). Under the same 3.5-bit budget (--kv-bits) its order (record by record, the cheap layers and
    the oldest chunks first) must give a lower PPL than the recency order (sink+int4: the oldest chunk, every
    layer), at the same bits, on text it was not trained on (wikitext-2 test, 2 windows of 512)."""
    router = ROOT / "models" / "smollm2-135m-moqae-balanced.gguf"
    budget = ["--kv-bits", "3.5", "--kv-overflow", "demote"]
    learned, st_l = ppl(bin_dir, smollm2, None, b=32, chunks=2, c=512, extra=["--router", router, *budget])
    recency, st_r = ppl(bin_dir, smollm2, "sink+int4", b=32, chunks=2, c=512, extra=budget)
    bits_l, bits_r = float(st_l.group(9)), float(st_r.group(9))  # effective bits of the last window
    assert 3.3 <= bits_r <= 3.5 and 3.3 <= bits_l <= 3.5, (bits_l, bits_r)
    assert learned < recency, (learned, recency)
