"""The forward pass against the PyTorch reference (train/reference.py in float64, with an exact KV cache
and f32 activations) on tiny synthetic models of every weight type, and the greedy decode reproducing
the reference's token ids. Uses the Python package's llama-cpp-python-style API (eval + scores)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from make_tiny import make_tiny
from reference import LlamaModel

moqae_cpp = pytest.importorskip("moqae_cpp", reason="the moqae_cpp package is not installed (pip install .)")

# Relative error of the logits (max |ours - ref| / max |ref|). F32 weights: only the f16 KV cache and
# float rounding separate us from the float64 reference. Quantized weights: activations are also
# quantized to 8 bits (Q8_0/Q8_1, as llama.cpp does) before the dot products.
TOL = {"f32": 2e-3, "f16": 3e-3, "bf16": 1e-2, "q8_0": 2e-2, "q4_0": 3e-2, "q4_1": 3e-2}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    out = {}
    for wtype in TOL:
        p = d / f"tiny-{wtype}.gguf"
        make_tiny(p, wtype=wtype, vocab="bytes", n_layer=2, n_embd=64, n_head=4, n_head_kv=2, n_ff=96,
                  tied=(wtype == "q8_0"), seed=1)
        out[wtype] = str(p)
    return out


@pytest.mark.parametrize("wtype", list(TOL))
@pytest.mark.parametrize("n_batch", [7, 64])
def test_logits_match_reference(tiny_models, wtype, n_batch):
    path = tiny_models[wtype]
    ref = LlamaModel(path, dtype=torch.float64, act_quant=False)
    rng = np.random.default_rng(3)
    toks = rng.integers(0, ref.hp.n_vocab, size=40).tolist()
    want = ref.forward(toks).numpy()
    with moqae_cpp.Llama(path, n_ctx=64, n_batch=n_batch, n_threads=2, logits_all=True) as llm:
        llm.eval(toks)
        got = np.asarray(llm.scores[:len(toks)], dtype=np.float64)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < TOL[wtype], f"{wtype}: relative max error {err:.2e}, first rows:\n{got[:2, :6]}\n{want[:2, :6]}"


def test_greedy_decode_reproduces_reference(tiny_models):
    path = tiny_models["f32"]
    ref = LlamaModel(path, dtype=torch.float64, act_quant=False)
    toks = [5, 17, 42, 99]
    ref_toks = list(toks)
    for _ in range(12):
        ref_toks.append(int(ref.forward(ref_toks)[-1].argmax()))
    with moqae_cpp.Llama(path, n_ctx=64, n_threads=1) as llm:
        ours = list(toks)
        for t in llm.generate(toks, temp=0.0, top_k=1):
            ours.append(int(t))
            if len(ours) == len(ref_toks):
                break
    assert ours == ref_toks
