"""Drop-in check (issue 3): one script body — completion, streaming, chat, tokenize/detokenize — runs
unchanged against llama_cpp.Llama (llama-cpp-python) and moqae_cpp.Llama on SmolLM2-135M, and the
returned structures have the same keys and value types. The texts themselves may differ (different
kernels round differently), the tokenizations may not. Skipped only when llama_cpp is not importable.
"""
from __future__ import annotations

import inspect
import json

import pytest

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36); CI installs it")
import moqae_cpp  # noqa: E402

MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name one primary color."},
]


def script(lib, model_path: str) -> dict:
    """A typical llama-cpp-python user script; `lib` is the module (import moqae_cpp as llama_cpp)."""
    llm = lib.Llama(model_path=model_path, n_ctx=256, n_threads=1, seed=1, verbose=False)
    out = {}
    out["completion"] = llm("The capital of France is", max_tokens=8, temperature=0)
    out["completion_stop"] = llm.create_completion("Q: Name a color.\nA:", max_tokens=16, stop=["\n", "Q:"],
                                                   temperature=0.7, top_p=0.9, top_k=20, seed=3)
    out["completion_echo"] = llm("Hello", max_tokens=4, echo=True, temperature=0)
    out["stream"] = list(llm("Once upon a time", max_tokens=8, temperature=0, stream=True))
    out["chat"] = llm.create_chat_completion(messages=MESSAGES, max_tokens=12, temperature=0)
    out["chat_stream"] = list(llm.create_chat_completion(messages=MESSAGES, max_tokens=8, stream=True))
    tokens = llm.tokenize(b"Hello, world! \xc3\xa9t\xc3\xa9 <|im_start|>")
    out["tokenize"] = tokens
    out["tokenize_special"] = llm.tokenize(b"<|im_start|>user\nhi<|im_end|>", add_bos=False, special=True)
    out["detokenize"] = llm.detokenize(tokens)
    out["sizes"] = [llm.n_ctx(), llm.n_vocab(), llm.token_bos(), llm.token_eos()]
    llm.close()
    return out


def shape(x):
    """Keys and value types, recursively; a list becomes the set of its elements' shapes."""
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return sorted({json.dumps(shape(v), sort_keys=True) for v in x})
    return type(x).__name__


@pytest.fixture(scope="module")
def both(smollm2):
    return script(llama_cpp, smollm2), script(moqae_cpp, smollm2)


@pytest.mark.parametrize("key", ["completion", "completion_stop", "completion_echo", "stream", "chat",
                                 "chat_stream", "tokenize", "detokenize", "sizes"])
def test_same_structure(both, key):
    theirs, ours = both
    assert shape(ours[key]) == shape(theirs[key])


def test_stream_framing(both):
    for key in ("stream", "chat_stream"):
        theirs, ours = (b[key] for b in both)
        assert shape(ours[0]) == shape(theirs[0]) and shape(ours[-1]) == shape(theirs[-1])
        assert [c["choices"][0]["finish_reason"] is None for c in ours[:-1]] == [True] * (len(ours) - 1)


def test_same_tokens(both):
    theirs, ours = both
    for key in ("tokenize", "tokenize_special", "detokenize", "sizes"):
        assert ours[key] == theirs[key], key
    assert ours["completion_echo"]["choices"][0]["text"].startswith("Hello")


def test_same_signatures():
    """Positional parameters come in llama_cpp's order; every keyword we take exists there too."""
    extras = {"__init__": {"router_path", "kv", "kv_budget", "kv_bits", "kv_overflow", "kv_keys"}, "generate": {"seed"}}
    for name in ("__init__", "create_completion", "__call__", "create_chat_completion", "generate", "tokenize",
                 "detokenize", "eval", "reset", "n_ctx", "n_vocab", "token_bos", "token_eos", "close"):
        ours = inspect.signature(getattr(moqae_cpp.Llama, name)).parameters
        theirs = inspect.signature(getattr(llama_cpp.Llama, name)).parameters
        pos = [p for p, v in ours.items() if v.kind == v.POSITIONAL_OR_KEYWORD]
        assert pos == [p for p, v in theirs.items() if v.kind == v.POSITIONAL_OR_KEYWORD][: len(pos)], name
        named = {p for p, v in ours.items() if v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)}
        assert named - set(theirs) - extras.get(name, set()) == set(), name
