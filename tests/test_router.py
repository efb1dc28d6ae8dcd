"""test_router.py — MoQAE routers in the runtime: loading and checking router files
(docs/ROUTER-FORMAT.md) against the model, routing every completed chunk in prefill and decode, and
the errors of bad router files (docs/BAD-INPUT.md). Routers are written by train/export_router.py
for tiny models (models/make_tiny.py); the reference's decisions are compared in
test_reference_parity.py."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import make_bad
from conftest import bin_path, clean_failure, no_crash, run_tool
from export_router import write_router
from make_tiny import make_tiny
from reference import model_fingerprint
from router import Router, RouterConfig

import moqae_cpp

SHAPE = dict(n_embd=64, n_layer=3, n_head=4, n_head_kv=2, n_ff=128, n_ctx=512)


def _tiny(path: Path, **kw) -> Path:
    make_tiny(path, vocab="bytes", wtype="q8_0", **{"seed": 0, **SHAPE, **kw})
    return path


def _base(path: Path, n_layer: int = SHAPE["n_layer"], n_embd: int = SHAPE["n_embd"]) -> dict:
    return {"architecture": "llama", "n_embd": n_embd, "n_layer": n_layer, "n_vocab": 261,
            "fingerprint": model_fingerprint(str(path))}


def _router(path: Path, model: Path, *, experts=("fp16", "int4", "int2"), share="all", group_size=0, chunk=32,
            freeze=True, seed=0, scale=400.0, bias=None, expected_bits=16.0, n_layer=SHAPE["n_layer"],
            demote_weight=None) -> Path:
    cfg = RouterConfig(n_embd=SHAPE["n_embd"], n_layer=n_layer, experts=experts, chunk=chunk, hidden=8, share=share,
                       group_size=group_size, freeze=freeze)
    r = Router(cfg, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        r.w3.mul_(scale)
        if bias is not None:  # every token votes for expert `bias`: w3 rows of the others pushed far down
            r.w1.zero_()
            r.w2.zero_()
    write_router(str(path), r, _base(model, n_layer), 0.5, expected_bits, demote_weight=demote_weight)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("router")
    return _tiny(d / "tiny.gguf")


@pytest.fixture(scope="module")
def routers(tiny, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("routers")
    return {
        "all": _router(d / "all.gguf", tiny),
        "g2": _router(d / "g2.gguf", tiny, share="group", group_size=2, seed=1),
        "none": _router(d / "none.gguf", tiny, share="none", seed=2),
        "c64": _router(d / "c64.gguf", tiny, chunk=64, experts=("fp16", "int8", "int4", "int2"), seed=3),
    }


TEXT = ("The quick brown fox jumps over the lazy dog. " * 20)[:700]


def _llm(model, router, **kw):
    kw.setdefault("n_ctx", 512)
    kw.setdefault("n_threads", 2)
    return moqae_cpp.Llama(str(model), router_path=str(router), **kw)


# ---- routing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["all", "g2", "none", "c64"])
def test_routed_prefill_does_not_depend_on_micro_batch(tiny, routers, name):
    outs = []
    for n_batch in (512, 100, 7):
        with _llm(tiny, routers[name], n_batch=n_batch, logits_all=True) as llm:
            toks = llm.tokenize(TEXT.encode(), add_bos=True)[:300]
            llm.eval(toks)
            outs.append((np.array(llm.scores[: len(toks)]), llm.kv_cache_stats()))
    for logits, stats in outs[1:]:
        np.testing.assert_allclose(logits, outs[0][0], rtol=0, atol=2e-4)
        assert stats["n_records"] == outs[0][1]["n_records"]


def test_decisions_vary_and_first_chunk_is_frozen(tiny, routers):
    with _llm(tiny, routers["none"]) as llm:
        llm.eval(llm.tokenize(TEXT.encode(), add_bos=True)[:320])  # 10 chunks
        s = llm.kv_cache_stats()
    rec = s["n_records"]
    assert sum(rec.values()) == 10 * SHAPE["n_layer"]
    assert rec["fp16"] >= SHAPE["n_layer"]  # chunk 0 frozen in every layer
    assert sum(1 for v in rec.values() if v) >= 2, f"a confident random router should vary: {rec}"
    assert llm.router_info["n_router"] == SHAPE["n_layer"]


def test_decode_routes_like_prefill(tiny, routers):
    """Token-by-token decode completes and routes chunks exactly as one prefill does."""
    with _llm(tiny, routers["g2"], logits_all=True) as a, _llm(tiny, routers["g2"], logits_all=True) as b:
        toks = a.tokenize(TEXT.encode(), add_bos=True)[:200]
        a.eval(toks)
        for t in toks:
            b.eval([t])
        assert a.kv_cache_stats()["n_records"] == b.kv_cache_stats()["n_records"]
        np.testing.assert_allclose(np.array(b.scores[: len(toks)]), np.array(a.scores[: len(toks)]), rtol=0,
                                   atol=2e-4)


def test_weighted_demotion_takes_the_cheap_layers_first(tiny, tmp_path):
    """A router that votes int4 for every chunk, under a budget 5% below what that needs, with
    --kv-overflow demote. Without demotion weights (recency) the oldest chunks go to int2 in every layer at
    once; with weights 1e6 for one layer and 1 for the others, only that layer's records are demoted (age x
    weight ranks them first), so at most one int2 record per chunk, and which layer it is changes the logits."""
    L = SHAPE["n_layer"]

    def run(name, dw, budget=None):
        r = _router(tmp_path / f"{name}.gguf", tiny, experts=("int4", "int2"), bias=0, expected_bits=4.0,
                    demote_weight=dw)
        with _llm(tiny, r, n_batch=32, logits_all=True, kv_budget=budget,
                  kv_overflow="demote" if budget else None) as llm:
            toks = llm.tokenize(TEXT.encode(), add_bos=True)[:480]  # 15 chunks: the sink and 14 routed
            llm.eval(toks)
            return llm.kv_cache_stats(), np.array(llm.scores[: len(toks)])

    full, _ = run("plain", None)
    assert full["n_records"] == {"fp16": L, "int8": 0, "int4": 14 * L, "int2": 0}
    budget = int(0.95 * full["bytes_used"])
    recency, _ = run("recency", None, budget)
    first, lf = run("first", [1e6] + [1.0] * (L - 1), budget)
    last, ll = run("last", [1.0] * (L - 1) + [1e6], budget)
    assert recency["n_records"]["int2"] > 0 and recency["n_records"]["int2"] % L == 0, recency
    for s in (recency, first, last):
        assert s["bytes_used"] <= budget and sum(s["n_records"].values()) == 15 * L, s
    for s in (first, last):
        assert 0 < s["n_records"]["int2"] <= 14, s  # one layer's records only
        assert s["n_records"]["int2"] < recency["n_records"]["int2"]  # finer than whole chunks
    assert np.isfinite(lf).all() and np.isfinite(ll).all()
    assert np.abs(lf - ll).max() > 1e-3  # different layers were demoted
    # a budget that cannot hold the next chunk even with every older record at int2: a clear error, and
    # nothing demoted (the records are as before the failed eval)
    r = _router(tmp_path / "tight.gguf", tiny, experts=("int4", "int2"), bias=0, expected_bits=4.0,
                demote_weight=[1.0] * L)
    with _llm(tiny, r, n_batch=32, kv_budget=int(0.5 * full["bytes_used"]), kv_overflow="demote") as llm:
        toks = llm.tokenize(TEXT.encode(), add_bos=True)[:480]
        n = 0
        with pytest.raises(moqae_cpp.ContextFullError, match="nothing was demoted"):
            for n in range(0, 480, 32):
                before = llm.kv_cache_stats()["n_records"]
                llm.eval(toks[n:n + 32])
        assert n > 32 and llm.kv_cache_stats()["n_records"] == before


def test_kv_bits_sets_the_budget(tiny, bin_dir):
    """kv_bits = B: a budget of B effective bits per element over n_ctx tokens; a full context then averages at
    most B bits. Bad values and kv_bits with kv_budget are clear errors, in Python and in the CLI."""
    toks = list(range(3, 259)) * 2  # 512 tokens: every chunk complete, no f16 window left

    def bits(kv, **kw):
        with moqae_cpp.Llama(str(tiny), kv=kv, n_ctx=512, n_batch=32, **kw) as llm:
            llm.eval(toks)
            return llm.kv_cache_stats()

    e4, e2 = bits("int4")["effective_bits"], bits("int2")["effective_bits"]  # head_dim 16: metadata-heavy
    B = (e4 + e2) / 2
    s = bits("int4", kv_bits=B, kv_overflow="demote")
    assert e2 <= s["effective_bits"] <= B and s["n_records"]["int2"] > 0 and s["n_records"]["int4"] > 0, (s, e4, e2)
    with pytest.raises(moqae_cpp.InvalidArgumentError, match="either kv_budget or kv_bits"):
        moqae_cpp.Llama(str(tiny), kv="int4", kv_bits=3.0, kv_budget=1 << 20)
    with pytest.raises(moqae_cpp.InvalidArgumentError, match="kv_bits must be between 1 and 16"):
        moqae_cpp.Llama(str(tiny), kv="int4", kv_bits=0.5)
    clean_failure(run_tool([bin_dir / "moqae-cli", "-m", tiny, "--kv-bits", "17", "-p", "hi", "-n", "1"]),
                  "--kv-bits expects bits per element between 1 and 16")


def test_bad_demotion_weights(tiny, tmp_path):
    with pytest.raises(ValueError, match="one weight"):
        _router(tmp_path / "short.gguf", tiny, demote_weight=[1.0])
    good = _router(tmp_path / "dw.gguf", tiny, demote_weight=[1.0, 1.2345, 3.0])
    neg = _replace(good, tmp_path / "neg.gguf", struct.pack("<f", 1.2345), struct.pack("<f", -1.2345))
    with pytest.raises(moqae_cpp.FormatError, match="layer 1.s weight -1.2345 is not in"):
        moqae_cpp.Llama(str(tiny), router_path=str(neg))
    with pytest.raises(moqae_cpp.InvalidArgumentError, match="kv_overflow must be one of"):
        moqae_cpp.Llama(str(tiny), router_path=str(good), kv_overflow="drop")
    with pytest.raises(moqae_cpp.InvalidArgumentError, match="kv_budget must be"):
        moqae_cpp.Llama(str(tiny), router_path=str(good), kv_budget=-1)


def test_freeze_off_and_one_expert_everywhere(tiny, tmp_path):
    """A router whose every token votes int2, without freezing: every chunk int2, chunk 0 included;
    with freezing chunk 0 is fp16."""
    for freeze, fp16 in ((False, 0), (True, 1)):
        cfg = RouterConfig(n_embd=SHAPE["n_embd"], n_layer=SHAPE["n_layer"], hidden=8, freeze=freeze)
        r = Router(cfg, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # h = silu(w1 x) * (w2 x) with w1 = w2 = mean direction: h >= 0 mostly;
            r.w1.fill_(0.0)  # h = 0 -> logits 0 -> ties -> expert 0; so give w3 a large int2 bias via h = const
            r.w2.fill_(0.0)
            r.w1[..., 0, :] = 1.0
            r.w2[..., 0, :] = 1.0
            r.w3.fill_(0.0)
            r.w3[..., 2, 0] = 100.0  # expert 2 (int2) wins whenever h0 > 0, i.e. always (silu(a)*a > 0)
        path = tmp_path / f"int2-{freeze}.gguf"
        write_router(str(path), r, _base(tiny), 0.5, 2.0)
        with _llm(tiny, path) as llm:
            llm.eval(llm.tokenize(TEXT.encode(), add_bos=True)[:256])
            s = llm.kv_cache_stats()
        assert s["n_chunks"] == {"fp16": fp16, "int8": 0, "int4": 0, "int2": 8 - fp16}, s


def test_cli_perplexity_and_bench_take_a_router(tiny, routers, bin_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 4)
    r = run_tool([bin_dir / "moqae-perplexity", "-m", tiny, "-f", text, "-c", "128", "--router", routers["all"],
                  "-t", "2"])
    no_crash(r)
    assert r.returncode == 0, r.stderr
    assert "router" in r.stderr and "Final estimate" in r.stdout
    r = run_tool([bin_dir / "moqae-cli", "-m", tiny, "-p", "hello", "-n", "40", "--router", routers["none"],
                  "-t", "2", "--temp", "0"])
    assert r.returncode == 0, r.stderr
    assert "kv cache:" in r.stderr and "router" in r.stderr
    r = run_tool([bin_dir / "moqae-bench", "-m", tiny, "-p", "64", "-n", "8", "-r", "1", "--router", routers["all"],
                  "-t", "2"])
    assert r.returncode == 0, r.stderr


# ---- bad router files -------------------------------------------------------------------------------

def _patch_u32(src: Path, dst: Path, key: str, value: int) -> Path:
    buf = bytearray(src.read_bytes())
    pos = make_bad.layout(bytes(buf)).keys[key] + len(key) + 4  # after the key bytes and the u32 type
    struct.pack_into("<I", buf, pos, value)
    dst.write_bytes(bytes(buf))
    return dst


def _replace(src: Path, dst: Path, old: bytes, new: bytes) -> Path:
    buf = src.read_bytes()
    assert len(old) == len(new) and old in buf
    dst.write_bytes(buf.replace(old, new, 1))
    return dst


def _bad_routers(tiny: Path, good: Path, d: Path) -> list:
    """(name, router file, model, python exception, message regex)"""
    other = _tiny(d / "other.gguf", seed=1)
    deeper = _tiny(d / "deeper.gguf", n_layer=4)
    short = _tiny(d / "short.gguf", n_ctx=16)
    nan = bytearray(good.read_bytes())
    lay = make_bad.layout(bytes(nan))
    t = lay.tensors["router.0.w3"]
    struct.pack_into("<f", nan, lay.data_offset + t.offset + 4, float("nan"))
    (d / "nan.gguf").write_bytes(bytes(nan))
    return [
        ("other model, same shape", good, other, moqae_cpp.InvalidArgumentError, "another model of the same shape"),
        ("other shape", good, deeper, moqae_cpp.InvalidArgumentError, "n_layer 3.*4"),
        ("not a router", tiny, tiny, moqae_cpp.FormatError, "not a router file"),
        ("truncated", make_bad.truncated(good, d / "trunc.gguf"), tiny, moqae_cpp.FormatError, "router .*"),
        ("missing file", d / "absent.gguf", tiny, moqae_cpp.ModelNotFoundError, "absent.gguf"),
        ("unknown expert", _replace(good, d / "int3.gguf", b"int2", b"int3"), tiny, moqae_cpp.UnsupportedError,
         "'int3', not a codec this runtime has"),
        ("chunk size 48", _patch_u32(good, d / "c48.gguf", "moqae-router.chunk_size", 48), tiny,
         moqae_cpp.UnsupportedError, "chunk size 48"),
        ("input layer 2", _patch_u32(good, d / "in2.gguf", "moqae-router.input_layer", 2), tiny,
         moqae_cpp.UnsupportedError, "input layer 2"),
        ("format version 2", _patch_u32(good, d / "v2.gguf", "moqae-router.format_version", 2), tiny,
         moqae_cpp.UnsupportedError, "format version 2"),
        ("wrong n_router", _patch_u32(good, d / "nr.gguf", "moqae-router.n_router", 2), tiny, moqae_cpp.FormatError,
         "does not fit a model of 3 layers"),
        ("NaN weight", d / "nan.gguf", tiny, moqae_cpp.FormatError, "non-finite value"),
        ("chunk longer than the model's context", good, short, moqae_cpp.InvalidArgumentError,
         "exceed the model's context"),
    ]


@pytest.fixture(scope="module")
def bad(tiny, routers, tmp_path_factory):
    return _bad_routers(tiny, routers["all"], tmp_path_factory.mktemp("bad-routers"))


def test_bad_routers_python(bad):
    for name, router, model, exc, pattern in bad:
        with pytest.raises(exc, match=pattern):
            moqae_cpp.Llama(str(model), router_path=str(router), n_ctx=64 if "context" in name else 256)


def test_bad_routers_cli(bad, bin_dir):
    for name, router, model, exc, pattern in bad:
        r = run_tool([bin_dir / "moqae-cli", "-m", model, "--router", router, "-p", "hi", "-n", "1", "-c", "64"])
        clean_failure(r, pattern)


def test_kv_and_router_together(tiny, routers, bin_dir):
    with pytest.raises(moqae_cpp.InvalidArgumentError, match="either a KV policy"):
        moqae_cpp.Llama(str(tiny), router_path=str(routers["all"]), kv="int4")
    clean_failure(run_tool([bin_dir / "moqae-cli", "-m", tiny, "--router", routers["all"], "--kv", "int4", "-p", "hi",
                            "-n", "1"]), "either --kv or --router")


def test_router_budget_overflow_policies(tiny, routers):
    """A router that claims 2 expected bits (the ring is sized from them) on text it routes mostly to
    fp16: with the default overflow policy (error) the budget runs out with a clear message."""
    d = Path(routers["all"]).parent
    cfg_path = d / "fp16-heavy.gguf"
    _router(cfg_path, tiny, scale=400.0, seed=0, expected_bits=2.0)
    toks = list(range(3, 250)) + list(range(3, 250))
    with _llm(tiny, cfg_path) as llm:
        with pytest.raises(moqae_cpp.ContextFullError, match="KV budget"):
            llm.eval(toks[:480])
