"""Property-based tests (hypothesis) of the Python API on SmolLM2: tokenize/detokenize round trips on
arbitrary text, and arbitrary sequences of API calls (including misuse: closing twice, use after
close, invalid tokens, overflowing the context, interleaving two contexts) never crash, always raise
the documented exception types, and leave the objects consistent."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

moqae_cpp = pytest.importorskip("moqae_cpp", reason="the moqae_cpp package is not installed")

N_CTX = 64
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def llm(smollm2):
    with moqae_cpp.Llama(smollm2, n_ctx=N_CTX, n_threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def missing_bytes(llm):
    """Bytes with no token in SmolLM2's vocabulary (BPE drops them, as HF and llama.cpp do)."""
    return {b for b in range(256) if not llm.tokenize(bytes([b]), add_bos=False)}


@SETTINGS
@given(st.text(max_size=200))
def test_text_round_trip(llm, missing_bytes, text):
    data = text.encode("utf-8")
    toks = llm.tokenize(data, add_bos=False, special=False)
    assert all(0 <= t < llm.n_vocab() for t in toks)
    assert llm.detokenize(toks) == bytes(b for b in data if b not in missing_bytes)


@SETTINGS
@given(st.binary(max_size=200))
def test_bytes_round_trip(llm, missing_bytes, data):
    toks = llm.tokenize(data, add_bos=False, special=False)
    want = bytes(b for b in data if b not in missing_bytes)
    assert llm.detokenize(toks) == want


OPS = st.lists(st.sampled_from(["eval", "eval_bad", "eval_long", "reset", "logits", "stats", "generate",
                                "tokenize"]), max_size=12)


def _apply(m, op):
    """One API call; returns normally or raises one of the documented exception types."""
    if op == "eval":
        m.eval(m.tokenize(b"Hello there", add_bos=False))
    elif op == "eval_bad":
        with pytest.raises(ValueError):
            m.eval([m.n_vocab() + 5])
    elif op == "eval_long":
        try:
            m.eval(m.tokenize(b"word " * (N_CTX + 10), add_bos=False))
        except moqae_cpp.ContextFullError:
            pass
    elif op == "reset":
        m.reset()
    elif op == "logits":
        _ = m.scores
    elif op == "stats":
        s = m.kv_cache_stats()
        assert s["n_tokens"] <= N_CTX
    elif op == "generate":
        try:
            m(b"Hi", max_tokens=2, temperature=0.0)
        except moqae_cpp.ContextFullError:
            pass
    elif op == "tokenize":
        assert m.tokenize(b"abc", add_bos=False)


@SETTINGS
@given(OPS, OPS)
def test_interleaved_contexts_and_misuse(smollm2, ops_a, ops_b):
    a = moqae_cpp.Llama(smollm2, n_ctx=N_CTX, n_threads=1)
    b = moqae_cpp.Llama(smollm2, n_ctx=N_CTX, n_threads=1, kv="int4")
    try:
        for i in range(max(len(ops_a), len(ops_b))):
            for m, ops in ((a, ops_a), (b, ops_b)):
                if i < len(ops):
                    _apply(m, ops[i])
                    assert m.n_tokens == m._ctx.n_past()
    finally:
        a.close()
        b.close()
    a.close()  # closing twice is fine
    for m in (a, b):
        for call in (lambda: m.eval([1]), lambda: m.tokenize(b"x"), lambda: m.kv_cache_stats(), lambda: m("x")):
            with pytest.raises(moqae_cpp.ClosedError):
                call()
