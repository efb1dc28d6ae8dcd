"""The Python package moqae_cpp (issue 3): cffi binding kept in sync with moqae.h, the Llama facade
on SmolLM2-135M (completion, streaming, chat, tokens, logits, KV stats, perplexity), errors and
misuse (closed objects, bad ids, full context, Ctrl-C, interrupt), threads, the console scripts.
Needs the package installed in the test environment (pip install --no-build-isolation .)."""
from __future__ import annotations

import _thread
import gc
import importlib.metadata
import inspect
import logging
import math
import re
import subprocess
import sys
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

try:
    import moqae_cpp
except ImportError as e:  # a clear failure, not a skip: the package is part of the product
    raise ImportError(f"moqae_cpp is not installed in {sys.prefix}: run `pip install --no-build-isolation .` "
                      f"({e})") from e

from moqae_cpp import _build_ffi
from moqae_cpp._native import ffi, lib
from moqae_cpp._text import TextAssembler, complete_utf8_end

HEADER = ROOT / "runtime/include/moqae.h"
EXCERPT = ROOT / "tests/data/wikitext-2-excerpt.txt"
N_CTX = 256


@pytest.fixture(scope="module")
def llm(smollm2):
    with moqae_cpp.Llama(smollm2, n_ctx=N_CTX, n_threads=1) as m:
        yield m


def greedy(m, prompt, n=12, **kw):
    return m(prompt, max_tokens=n, temperature=0, **kw)["choices"][0]["text"]


@pytest.fixture(scope="module")
def reference(llm):
    """Greedy completions from a fresh context: what every 'still usable' check compares with."""
    llm.reset()
    return {p: greedy(llm, p) for p in ("The capital of France is", "Once upon a time")}


def assert_consistent(m):
    assert m.n_tokens == m._ctx.n_past()


# ---- build, binding, import ---------------------------------------------------------------------


def test_import_checks_version():
    assert moqae_cpp.__version__ == ffi.string(lib.moqae_version()).decode()
    assert moqae_cpp.__version__ == importlib.metadata.version("moqae-cpp")
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"project\(moqae\s+VERSION\s+" + re.escape(moqae_cpp.__version__) + r"\b", cmake)
    assert (Path(moqae_cpp.__file__).parent / "py.typed").exists()
    assert moqae_cpp.cpu_backend() in ("avx512", "avx2", "scalar")
    assert moqae_cpp.has_cuda() in (True, False)


def test_cdef_matches_header():
    text = HEADER.read_text()
    cdef = _build_ffi.cdef_from_header(text)
    ffi2 = __import__("cffi").FFI()
    ffi2.cdef(cdef)  # cffi accepts what we derived
    functions = _build_ffi.exported_functions(text)
    assert len(functions) >= 30
    missing = [f for f in functions if not hasattr(lib, f)]
    assert not missing, f"built module lacks {missing}: rebuild the package"
    for name, value in re.findall(r"\b(MOQAE_[A-Z0-9_]+)\s*=\s*(-?\d+)", text):
        assert getattr(lib, name) == int(value), name
    # the module was compiled from the same declarations (API mode: the compiler checked them)
    for struct in ("moqae_model_params", "moqae_model_info", "moqae_context_params", "moqae_kv_stats",
                   "moqae_ppl_params", "moqae_ppl_result", "moqae_sampler_params"):
        assert ffi.sizeof(f"struct {struct}") == ffi2.sizeof(f"struct {struct}")


def test_cdef_parser_handles_preprocessor():
    text = """#ifndef X_H
#define X_H
#define MOQAE_N_EXPERTS 4
#ifdef __cplusplus
extern "C" {
#endif
#if defined(_WIN32)
#    define MOQAE_API __declspec(dllexport)
#else
#    define MOQAE_API __attribute__((visibility("default")))
#endif
/* a comment */ struct s { int a[MOQAE_N_EXPERTS]; }; // trailing
MOQAE_API int moqae_f(int x);
#ifdef __cplusplus
}
#endif
#endif
"""
    cdef = _build_ffi.cdef_from_header(text)
    assert "extern" not in cdef and "MOQAE_API" not in cdef and "comment" not in cdef
    f = __import__("cffi").FFI()
    f.cdef(cdef)
    assert f.sizeof("struct s") == 16
    assert _build_ffi.exported_functions(text) == ["moqae_f"]


def test_defaults_come_from_c(llm, smollm2):
    sp = lib.moqae_sampler_default_params()
    sig = inspect.signature(moqae_cpp.Llama.create_completion).parameters
    assert sig["temperature"].default == pytest.approx(sp.temp)
    assert sig["top_k"].default == sp.top_k
    assert sig["top_p"].default == pytest.approx(sp.top_p)
    assert sig["min_p"].default == pytest.approx(sp.min_p)
    assert sig["repeat_penalty"].default == pytest.approx(sp.repeat_penalty)
    # llama-cpp-python's documented defaults, which the drop-in promise fixes
    assert (sig["temperature"].default, sig["top_k"].default, sig["top_p"].default, sig["min_p"].default,
            sig["max_tokens"].default) == (0.8, 40, 0.95, 0.05, 16)
    init = inspect.signature(moqae_cpp.Llama.__init__).parameters
    assert init["n_gpu_layers"].default == lib.moqae_model_default_params().n_gpu_layers
    assert init["n_ctx"].default == 512  # llama_cpp.Llama's, documented; 0 = the model's
    with moqae_cpp.Llama(smollm2, n_ctx=0) as m:
        assert m.n_ctx() == 8192  # the C default: the model's training context


# ---- tokens -------------------------------------------------------------------------------------


def test_tokenize_detokenize(llm):
    toks = llm.tokenize(b"Hello world")
    assert toks == [19556, 905] and all(isinstance(t, int) for t in toks)
    assert llm.detokenize(toks) == b"Hello world"
    assert llm.tokenize("Hello world") == toks
    text = "Ünïcödé — 東京 🙂 and  spaces\n\ttabs".encode()
    assert llm.detokenize(llm.tokenize(text, add_bos=False)) == text
    assert llm.tokenize(b"") == []
    assert llm.detokenize([]) == b""
    special = llm.tokenize(b"<|im_start|>user", add_bos=False, special=True)
    plain = llm.tokenize(b"<|im_start|>user", add_bos=False, special=False)
    assert len(special) < len(plain)
    assert llm.detokenize(special, special=True) == b"<|im_start|>user"
    assert llm.detokenize(special) == b"user"
    assert llm.detokenize([toks[1]], prev_tokens=[toks[0]]) == b" world"


def test_model_queries(llm):
    assert llm.n_ctx() == N_CTX
    assert llm.n_vocab() == 49152
    assert llm.n_embd() == 576
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    assert llm.detokenize([llm.token_nl()]) == b"\n"


# ---- completion -----------------------------------------------------------------------------------


def check_completion_shape(r, n_prompt=None):
    assert set(r) == {"id", "object", "created", "model", "choices", "usage"}
    assert r["id"].startswith("cmpl-") and r["object"] == "text_completion"
    assert isinstance(r["created"], int) and isinstance(r["model"], str)
    (c,) = r["choices"]
    assert set(c) == {"text", "index", "logprobs", "finish_reason"}
    assert isinstance(c["text"], str) and c["index"] == 0 and c["finish_reason"] in ("stop", "length")
    u = r["usage"]
    assert set(u) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    if n_prompt is not None:
        assert u["prompt_tokens"] == n_prompt


def test_completion(llm, reference):
    r = llm("The capital of France is", max_tokens=12, temperature=0)
    check_completion_shape(r, n_prompt=len(llm.tokenize(b"The capital of France is")))
    assert r["choices"][0]["text"] == reference["The capital of France is"]
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 12
    assert r["choices"][0]["text"].startswith(" Paris")
    r2 = llm.create_completion(llm.tokenize(b"The capital of France is"), max_tokens=12, temperature=0)
    assert r2["choices"][0]["text"] == r["choices"][0]["text"]
    r3 = llm("The capital of France is", max_tokens=4, temperature=0, echo=True)
    assert r3["choices"][0]["text"].startswith("The capital of France is Paris")


def test_completion_matches_cli(llm, smollm2):
    cli = Path(sys.executable).parent / "moqae-cli"  # the console script the package installs
    prompt = "Once upon a time"
    r = subprocess.run([str(cli), "-m", smollm2, "-p", prompt, "-n", "12", "--temp", "0", "-t", "1", "-c",
                        str(N_CTX)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == prompt + greedy(llm, prompt)
    # seeded sampling goes through the same C sampler with the same history
    r = subprocess.run([str(cli), "-m", smollm2, "-p", prompt, "-n", "8", "--temp", "0.9", "-s", "7", "-t", "1",
                        "-c", str(N_CTX)], capture_output=True, text=True, timeout=300)
    assert r.stdout.rstrip("\n") == prompt + llm(prompt, max_tokens=8, temperature=0.9, seed=7)["choices"][0]["text"]


def test_console_scripts_exist():
    for tool in ("moqae-cli", "moqae-perplexity", "moqae-bench"):
        r = subprocess.run([str(Path(sys.executable).parent / tool), "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in (r.stdout + r.stderr), (tool, r.stderr)


def test_seeds(llm):
    a = [llm("Once upon a time", max_tokens=6, temperature=1.0, seed=s)["choices"][0]["text"] for s in (1, 1, 2, 3)]
    assert a[0] == a[1]
    assert len(set(a[1:])) > 1
    llm.set_seed(1)
    assert llm("Once upon a time", max_tokens=6, temperature=1.0)["choices"][0]["text"] == a[0]
    llm.set_seed(moqae_cpp.llama._SP["seed"])


def test_streaming(llm, reference):
    chunks = list(llm("The capital of France is", max_tokens=12, temperature=0, stream=True))
    for c in chunks:
        assert set(c) == {"id", "object", "created", "model", "choices"}
        assert c["object"] == "text_completion" and c["id"] == chunks[0]["id"]
        assert set(c["choices"][0]) == {"text", "index", "logprobs", "finish_reason"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == reference["The capital of France is"]
    assert len(chunks) > 3  # it really streams


def test_stop_strings(llm, reference):
    full = reference["Once upon a time"]
    word = full.split()[3]
    want = full[: full.index(word)]
    r = llm("Once upon a time", max_tokens=12, temperature=0, stop=[word, "zzzz"])
    assert r["choices"][0]["text"] == want and r["choices"][0]["finish_reason"] == "stop"
    chunks = [c["choices"][0] for c in llm("Once upon a time", max_tokens=12, temperature=0, stop=word, stream=True)]
    assert "".join(c["text"] for c in chunks) == want
    assert chunks[-1]["finish_reason"] == "stop"
    assert not any(word in c["text"] for c in chunks)


def test_end_of_generation_stops(llm):
    msgs = [{"role": "user", "content": "What is the capital of France? One word."}]
    r = llm.create_chat_completion(msgs, max_tokens=24, temperature=0)
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] < 24
    assert "<|im_end|>" not in r["choices"][0]["message"]["content"]


def test_text_assembler_utf8_and_stop_prefix():
    euro = "€".encode()  # 3 bytes
    t = TextAssembler([b"STOP"])
    assert t.push(b"a" + euro[:1]) == b"a"
    assert t.push(euro[1:2]) == b""
    assert t.push(euro[2:] + b" ST") == euro + b" "  # "ST" could begin "STOP": held back
    assert t.push(b"O") == b""
    assert t.push(b"X") == b"STOX"
    assert t.push(b"..STO") == b".."
    assert t.push(b"Pmore") == b"" and t.stop_at is not None
    assert t.text() == b"a" + euro + b" STOX.."
    t = TextAssembler([])
    assert t.push(b"\xff\xfe") == b"\xff\xfe"  # invalid bytes are complete (U+FFFD), not held forever
    assert t.push(b"\xf0\x9f") == b"" and t.flush() == b"\xf0\x9f"
    assert complete_utf8_end(b"ab\xc3", 0, 3) == 2 and complete_utf8_end(b"ab\xc3\xa9", 0, 4) == 4


def test_chat_completion(llm):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    r = llm.create_chat_completion(msgs, max_tokens=16, temperature=0)
    assert set(r) == {"id", "object", "created", "model", "choices", "usage"}
    assert r["id"].startswith("chatcmpl-") and r["object"] == "chat.completion"
    (c,) = r["choices"]
    assert set(c) == {"index", "message", "logprobs", "finish_reason"}
    assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
    chunks = list(llm.create_chat_completion(msgs, max_tokens=16, temperature=0, stream=True))
    assert all(k["object"] == "chat.completion.chunk" for k in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == c["finish_reason"]
    assert "".join(k["choices"][0]["delta"].get("content", "") for k in chunks) == c["message"]["content"]
    # the template was applied: the prompt is ChatML with the generation prompt
    prompt = llm._chat_template().render(msgs)
    assert prompt.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")


def test_prefix_reuse_gives_same_result(llm, reference):
    llm.reset()
    a = greedy(llm, "Once upon a time")
    n = llm.n_tokens
    b = greedy(llm, "Once upon a time" + a)  # the context is a strict prefix: only the rest is evaluated
    llm.reset()
    c = greedy(llm, "Once upon a time" + a)
    assert b == c and n > 0


# ---- eval, logits, generate ------------------------------------------------------------------------


def test_eval_scores_generate(llm, smollm2):
    toks = llm.tokenize(b"The capital of France is")
    llm.reset()
    assert llm.n_tokens == 0 and llm.scores.shape == (0, 49152)
    llm.eval(toks)
    assert llm.n_tokens == len(toks) and list(llm.input_ids) == toks
    s = llm.scores
    assert s.shape == (1, 49152) and s.dtype == np.float32
    s[:] = 0  # a copy: the next read is unchanged
    assert llm.scores.any()
    first = int(np.argmax(llm.scores[0]))
    gen = llm.generate(toks, temp=0)
    out = [next(gen) for _ in range(5)]
    gen.close()
    assert out[0] == first
    assert llm.detokenize(out, prev_tokens=toks).decode() == greedy(llm, "The capital of France is", n=5)
    # logits_all keeps one row per token, and equals the last-token logits; micro-batches do not matter
    last = llm_last_logits(llm, toks)
    with moqae_cpp.Llama(smollm2, n_ctx=64, n_batch=3, logits_all=True, n_threads=1) as m:
        m.eval(toks)
        rows = m.scores
        assert rows.shape == (len(toks), 49152)
        np.testing.assert_allclose(rows[-1], last, rtol=1e-3, atol=1e-3)
        m.eval([first])
        assert m.scores.shape == (len(toks) + 1, 49152)
        np.testing.assert_array_equal(m.scores[: len(toks)], rows)


def llm_last_logits(llm, toks):
    llm.reset()
    llm.eval(toks)
    return llm.scores[0]


def test_logprobs(llm, smollm2):
    with pytest.raises(ValueError, match="logits_all"):
        llm("Hi", max_tokens=2, logprobs=3)
    with moqae_cpp.Llama(smollm2, n_ctx=64, logits_all=True, n_threads=1) as m:
        r = m("The capital of France is", max_tokens=4, temperature=0, logprobs=3)
        lp = r["choices"][0]["logprobs"]
        assert set(lp) == {"tokens", "text_offset", "token_logprobs", "top_logprobs"}
        assert len(lp["tokens"]) == 4 and "".join(lp["tokens"]) == r["choices"][0]["text"]
        assert all(v <= 0 for v in lp["token_logprobs"])
        assert all(len(t) >= 3 for t in lp["top_logprobs"])
        # greedy: the chosen token is the most likely one
        assert all(max(t.values()) == pytest.approx(v) for t, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
        r = m("The capital of France is", max_tokens=2, temperature=0, logprobs=1, echo=True)
        lp = r["choices"][0]["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["text_offset"][0] == 0
        chunks = list(m("The capital", max_tokens=3, temperature=0, logprobs=2, stream=True))
        assert any(c["choices"][0]["logprobs"] for c in chunks)


def test_kv_cache_stats(llm):
    llm.reset()
    llm.eval(llm.tokenize(b"Hello there"))
    s = llm.kv_cache_stats()
    assert set(s) == {"n_tokens", "n_ctx", "n_chunks", "nominal_bits", "effective_bits", "bytes_used",
                      "bytes_reserved", "n_records"}
    assert s["n_tokens"] == llm.n_tokens and s["n_ctx"] == N_CTX
    assert set(s["n_chunks"]) == {"fp16", "int8", "int4", "int2"}
    assert s["nominal_bits"] == 16 and s["effective_bits"] >= 16
    assert 0 < s["bytes_used"] <= s["bytes_reserved"]
    # SmolLM2, fp16 K and V: the chunk records for N_CTX tokens, plus the f32 window of the
    # incomplete chunk and one micro-batch
    assert s["bytes_reserved"] >= N_CTX * 30 * 2 * 3 * 64 * 2


def test_perplexity(llm, smollm2):
    text = EXCERPT.read_text()
    r = llm.perplexity(text, n_ctx=128, n_chunks=3)
    assert set(r) == {"ppl", "ppl_err", "nll", "n_scored", "n_chunks"}
    assert r["n_chunks"] == 3 and r["n_scored"] == 3 * 63
    assert 1 < r["ppl"] < 1000 and math.isclose(r["ppl"], math.exp(r["nll"]), rel_tol=1e-9)
    assert llm.n_tokens == 0  # it empties the context
    # the same figure as the tool (installed as a console script by the package)
    tool = Path(sys.executable).parent / "moqae-perplexity"
    out = subprocess.run([str(tool), "-m", smollm2, "-f", str(EXCERPT), "-c", "128", "--chunks", "3", "-t", "1"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert r["ppl"] == pytest.approx(float(re.search(r"PPL = ([0-9.]+)", out.stdout).group(1)), rel=1e-3)
    seen = []
    r2 = llm.perplexity(text[:8000], n_ctx=64, n_chunks=3, progress=lambda i, n, p: seen.append(i) or i < 1)
    assert seen == [0, 1] and r2["n_chunks"] == 2
    r3 = llm.perplexity(text[:8000], n_ctx=N_CTX + 32, n_chunks=1)  # larger than the context: a temporary one
    assert r3["n_chunks"] == 1 and llm.n_ctx() == N_CTX


# ---- errors and misuse --------------------------------------------------------------------------


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        moqae_cpp.Llama(str(tmp_path / "nope.gguf"))
    assert isinstance(e.value, moqae_cpp.MoqaeError) and "nope.gguf" in str(e.value)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTAGGUF" + b"\0" * 64)
    with pytest.raises(ValueError) as e:
        moqae_cpp.Llama(str(bad))
    assert isinstance(e.value, moqae_cpp.MoqaeError) and e.value.message
    with pytest.raises(moqae_cpp.MoqaeError):
        moqae_cpp.Llama(str(tmp_path))  # a directory


def test_bad_arguments(smollm2, llm):
    with pytest.raises(moqae_cpp.ModelNotFoundError, match="r.gguf"):  # routers: tests/test_router.py
        moqae_cpp.Llama(smollm2, router_path="r.gguf")
    with pytest.raises(ValueError):
        moqae_cpp.Llama(smollm2, n_ctx=-1)
    with pytest.raises(ValueError) as e:
        moqae_cpp.Llama(smollm2, n_ctx=64, kv="int3")
    assert "int3" in str(e.value)
    with pytest.raises(TypeError):
        moqae_cpp.Llama(smollm2, n_ctxx=64)
    with pytest.warns(UserWarning, match="use_mmap"):
        moqae_cpp.Llama(smollm2, n_ctx=32, use_mmap=True).close()
    with pytest.raises(NotImplementedError):
        llm("Hi", grammar="root ::= x")
    with pytest.raises(NotImplementedError):
        llm("Hi", frequency_penalty=0.5)
    with pytest.raises(TypeError):
        llm("Hi", max_tokenz=3)
    with pytest.raises(ValueError):
        llm("Hi", max_tokens=2, repeat_penalty=-1.0)


def test_invalid_tokens(llm, reference):
    for bad in ([49152], [-1], [2**40]):
        with pytest.raises(ValueError) as e:
            llm.eval(llm.tokenize(b"Hi") + bad)
        assert isinstance(e.value, moqae_cpp.InvalidTokenError)
        assert_consistent(llm)
        with pytest.raises(ValueError):
            llm.create_completion(bad, max_tokens=2)
        with pytest.raises(ValueError):
            llm.detokenize(bad)
    with pytest.raises(ValueError):
        next(llm.generate([5, 10**6]))
    assert greedy(llm, "Once upon a time") == reference["Once upon a time"]


def test_context_full(llm, reference):
    long = "word " * 400
    with pytest.raises(ValueError) as e:
        llm(long, max_tokens=4)
    assert isinstance(e.value, moqae_cpp.ContextFullError)
    with pytest.raises(ValueError, match="context full"):
        llm.eval(llm.tokenize(long.encode()))
    assert_consistent(llm)
    llm.reset()
    llm.eval(llm.tokenize(("word " * 200).encode())[:200])
    with pytest.raises(moqae_cpp.ContextFullError):
        llm.eval(llm.tokenize(("word " * 100).encode()))
    assert llm.n_tokens == 200
    # max_tokens is cut to what fits, as in llama-cpp-python
    r = llm(llm.tokenize(("word " * 300).encode())[: N_CTX - 3], max_tokens=50, temperature=0)
    assert r["usage"]["completion_tokens"] <= 3
    assert greedy(llm, "Once upon a time") == reference["Once upon a time"]


def test_use_after_close(smollm2):
    m = moqae_cpp.Llama(smollm2, n_ctx=32)
    m.close()
    m.close()  # idempotent
    for call in (lambda: m("Hi"), lambda: m.tokenize(b"Hi"), lambda: m.detokenize([1]), lambda: m.eval([1]),
                 m.n_ctx, m.n_vocab, m.token_bos, m.token_eos, m.reset, m.kv_cache_stats,
                 lambda: m.create_chat_completion([{"role": "user", "content": "x"}]), lambda: m.perplexity("x")):
        with pytest.raises(ValueError) as e:
            call()
        assert isinstance(e.value, moqae_cpp.ClosedError), call
    with moqae_cpp.Llama(smollm2, n_ctx=32) as m2:
        assert m2.n_ctx() == 32
    with pytest.raises(moqae_cpp.ClosedError):
        m2.n_ctx()
    # a stream outliving close() fails cleanly
    m3 = moqae_cpp.Llama(smollm2, n_ctx=32)
    it = m3("Once", max_tokens=8, stream=True)
    next(it)
    m3.close()
    with pytest.raises(moqae_cpp.ClosedError):
        list(it)


def test_handle_lifetimes(smollm2):
    model = moqae_cpp.Model(smollm2)
    ctx = moqae_cpp.Context(model, n_ctx=16, n_threads=1)
    del model
    gc.collect()
    ctx.decode([1, 2, 3], 1)  # the context keeps its model alive
    assert ctx.n_past() == 3 and ctx.logits().shape == (1, 49152)
    model = ctx.model
    model.close()  # frees the context first
    assert ctx.closed and model.closed
    with pytest.raises(moqae_cpp.ClosedError):
        ctx.decode([1], 1)
    ctx.close()
    # only __del__: no leak or crash when objects are just dropped, in any order
    for _ in range(3):
        m = moqae_cpp.Model(smollm2)
        c = moqae_cpp.Context(m, n_ctx=16, n_threads=1)
        c.decode([1], 1)
        del m, c
        gc.collect()


def test_stale_generator(llm, reference):
    g = llm.generate(llm.tokenize(b"Hello"), temp=0)
    next(g)
    llm("Hi", max_tokens=2)
    with pytest.raises(RuntimeError, match="stale"):
        next(g)
    assert greedy(llm, "Once upon a time") == reference["Once upon a time"]


class _Raise:
    """Wraps Context.decode_one to raise KeyboardInterrupt before or after the n-th call."""

    def __init__(self, ctx, n, after):
        self.real, self.n, self.after = ctx.decode_one, n, after

    def __call__(self, tok):
        self.n -= 1
        if self.n == 0 and not self.after:
            raise KeyboardInterrupt
        self.real(tok)
        if self.n == 0 and self.after:
            raise KeyboardInterrupt


@pytest.mark.parametrize("after", [False, True])
def test_keyboard_interrupt_between_tokens(llm, reference, after):
    llm._ctx.decode_one = _Raise(llm._ctx, 3, after)
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in llm("Once upon a time", max_tokens=12, temperature=0, stream=True):
                pass
    finally:
        del llm._ctx.decode_one
    assert_consistent(llm)
    assert greedy(llm, "Once upon a time") == reference["Once upon a time"]


@pytest.mark.parametrize("delay", [0.05, 0.8])
def test_real_ctrl_c(llm, reference, delay):
    """SIGINT from the terminal lands wherever the main thread is: between micro-batches of the prompt
    or between tokens. The stream stops with KeyboardInterrupt and the object stays usable."""
    prompt = "word " * 150
    timer = threading.Timer(delay, _thread.interrupt_main)
    caught = False
    # Python's own Ctrl-C handler, as in a terminal session: a library imported by an earlier test module
    # of the same pytest process may have replaced it, and interrupt_main() then raises nothing.
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer.start()
        for _ in llm(prompt, max_tokens=80, temperature=0, stream=True):
            pass
        timer.join()
        for _ in range(10**6):  # the pending KeyboardInterrupt fires here at the latest
            pass
    except KeyboardInterrupt:
        caught = True
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, old_handler)
    assert caught
    assert_consistent(llm)
    assert greedy(llm, "Once upon a time") == reference["Once upon a time"]


def test_interrupt_from_another_thread(smollm2):
    with moqae_cpp.Llama(smollm2, n_ctx=512, n_batch=16, n_threads=1) as m:
        toks = m.tokenize(("word " * 480).encode())[:480]
        threading.Timer(0.3, m.interrupt).start()
        with pytest.raises(RuntimeError) as e:
            m.eval(toks)
        assert isinstance(e.value, moqae_cpp.Interrupted)
        assert 0 < m.n_tokens < 480 and m.n_tokens % 16 == 0
        assert_consistent(m)
        m.reset()
        m.eval(toks[:20])  # usable again; an old interrupt does not leak into new calls
        assert m.n_tokens == 20


def test_threads(smollm2, reference):
    """Two Llama objects on two threads give the single-threaded results; the GIL is released."""
    results = {}

    def work(prompt):
        with moqae_cpp.Llama(smollm2, n_ctx=N_CTX, n_threads=1) as m:
            results[prompt] = greedy(m, prompt)

    threads = [threading.Thread(target=work, args=(p,)) for p in reference]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == reference

    with moqae_cpp.Llama(smollm2, n_ctx=512, n_threads=1) as m:
        toks = m.tokenize(("word " * 400).encode())[:400]
        t = threading.Thread(target=m.eval, args=(toks,))
        count = 0
        t0 = time.perf_counter()
        t.start()
        while t.is_alive():
            count += 1
        elapsed = time.perf_counter() - t0
    # with the GIL held for the whole decode the main thread could not spin at all
    assert elapsed > 0.2 and count > 1000


@pytest.mark.parametrize("ngl", [1, -1])  # -1: every layer, as llama-cpp-python spells it
def test_logs_go_to_logging(smollm2, caplog, ngl):
    with caplog.at_level(logging.WARNING, logger="moqae_cpp"):
        moqae_cpp.Llama(smollm2, n_ctx=16, n_gpu_layers=ngl).close()
    if not moqae_cpp.has_cuda():
        assert any("n_gpu_layers" in r.getMessage() for r in caplog.records if r.name == "moqae_cpp")


def test_verbose_shows_library_logs(smollm2, capfd):
    logger = logging.getLogger("moqae_cpp")
    handlers, level = list(logger.handlers), logger.level
    try:
        moqae_cpp.Llama(smollm2, n_ctx=16, n_gpu_layers=1, verbose=True).close()
        if not moqae_cpp.has_cuda():
            assert "n_gpu_layers" in capfd.readouterr().err
    finally:
        logger.handlers[:], logger.level = handlers, level
