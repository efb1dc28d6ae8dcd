"""train/train_router.py on a tiny synthetic model: a few steps write a router GGUF that follows
docs/ROUTER-FORMAT.md (keys, types, shapes, the model's fingerprint), that train/router.py and the
runtime load, and training is deterministic for a seed."""
from __future__ import annotations

import os

# sleeping OpenMP threads (train/reference.py says why); effective when this module imports torch first
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hashlib

import numpy as np
import pytest
import torch

from conftest import ROOT, run_tool

CALIB = ROOT / "tests/data/wikitext-2-excerpt.txt"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from make_tiny import make_tiny

    path = tmp_path_factory.mktemp("train") / "tiny.gguf"
    make_tiny(path, wtype="q8_0", vocab="bytes", n_layer=4, n_embd=64, n_head=4, n_head_kv=2, n_ff=96, seed=5)
    return str(path)


def run(tiny, out, seed=0, **kw):
    from train_router import TrainConfig, train

    opts = dict(experts="16,4,2", share="2", steps=3, seq_len=128, batch=2, lam=0.8, lr=0.05)
    opts.update(kw)
    tc = TrainConfig(model=tiny, calib=str(CALIB), out=str(out) if out else None, seed=seed, **opts)
    return train(tc, log=lambda s: None)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("router") / "r.gguf"
    router, info = run(tiny, out)
    return out, router, info


def test_router_file_follows_the_format(tiny, trained):
    from gguf import GGUFReader

    from reference import read_gguf

    out, router, info = trained
    r = GGUFReader(str(out))
    kv = {k: f.contents() for k, f in r.fields.items()}
    p = "moqae-router."
    assert kv["general.architecture"] == "moqae-router"
    assert kv[p + "format_version"] == 1
    assert kv[p + "chunk_size"] == 32
    assert kv[p + "experts.codec"] == ["fp16", "int4", "int2"]
    assert kv[p + "experts.bits"] == [16, 4, 2]
    assert kv[p + "freeze_first_chunk"] is True
    assert (kv[p + "share"], kv[p + "group_size"], kv[p + "n_router"]) == ("group", 2, 2)
    assert kv[p + "input_layer"] == 0 and kv[p + "hidden_size"] == 32
    assert kv[p + "base.architecture"] == "llama"
    assert (kv[p + "base.n_embd"], kv[p + "base.n_layer"]) == (64, 4)
    assert kv[p + "calibration"].endswith("wikitext-2-excerpt.txt")
    assert 2.0 <= kv[p + "expected_bits"] <= 16.0
    assert kv[p + "expected_bits"] == pytest.approx(info["expected_bits"], abs=1e-5)
    assert kv[p + "lambda"] == pytest.approx(0.8)
    meta, tensors = read_gguf(tiny)
    assert kv[p + "base.n_vocab"] == meta["tokenizer.ggml.tokens"]
    raw = tensors["token_embd.weight"][0]
    assert kv[p + "base.fingerprint"] == hashlib.sha256(np.ascontiguousarray(raw).data).hexdigest()
    shapes = {t.name: (t.tensor_type.name, tuple(np.asarray(t.data).shape)) for t in r.tensors}
    assert shapes == {f"router.{g}.{w}": ("F32", s) for g in range(2)
                      for w, s in (("w1", (32, 64)), ("w2", (32, 64)), ("w3", (3, 32)))}
    assert np.array_equal(np.asarray(next(t for t in r.tensors if t.name == "router.1.w3").data),
                          router.w3[1].detach().numpy())


def test_router_loads_back(tiny, trained):
    from reference import LlamaModel
    from router import load_router

    out, router, _ = trained
    loaded, meta = load_router(str(out), LlamaModel(tiny, n_layer=0))
    for name in ("w1", "w2", "w3"):
        assert torch.equal(getattr(loaded, name), getattr(router, name))
    assert loaded.cfg.n_router == 2 and loaded.cfg.group_size == 2


def test_runtime_loads_router(bin_dir, tiny, trained):
    if "--router" not in run_tool([bin_dir / "moqae-perplexity", "--help"]).stderr:
        pytest.skip("moqae-perplexity has no --router yet")
    r = run_tool([bin_dir / "moqae-perplexity", "-m", tiny, "-f", CALIB, "-c", 128, "--chunks", 2, "-t", 2,
                  "--router", trained[0]])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Final estimate" in r.stdout


def test_training_is_deterministic(tiny, trained):
    _, r1, i1 = trained
    r2, i2 = run(tiny, None)
    for name in ("w1", "w2", "w3"):
        assert torch.equal(getattr(r1, name), getattr(r2, name)), name
    assert [h["loss"] for h in i1["history"]] == [h["loss"] for h in i2["history"]]
    r3, _ = run(tiny, None, seed=1, steps=1)
    assert not torch.equal(r1.w3, r3.w3)


def test_loss_terms_and_options(tiny):
    """--no-freeze and per-layer routers (share none) run; the logged terms are finite and L_mem is
    the expected bits/16 of probabilities in [2/16, 1]."""
    router, info = run(tiny, None, steps=1, share="none", freeze=False, experts="8,2")
    assert router.cfg.n_router == 4 and router.cfg.experts == ("int8", "int2")
    h = info["history"][0]
    assert np.isfinite(h["l_model"]) and 2 / 16 <= h["l_mem"] <= 8 / 16
    assert sum(h["hist"].values()) == 2 * 4 * 4  # 2 windows x 4 routers x 4 chunks (chunk 0 routed too)


def test_linear_objective(tiny, tmp_path):
    """--objective linear: the measured sensitivities predict the NLL that coding every chunk INT2 instead
    of INT4 costs (first order, summed over chunks and layers), training is deterministic, and λ moves the
    bits the right way: all INT2 with the memory term alone, more bits as λ grows."""
    cache = str(tmp_path / "sens.pt")
    bits = {}
    for lam in (0.0, 0.9, 1.0):
        router, info = run(tiny, None, objective="linear", pool=4, batch=4, steps=30, lam=lam, sens_cache=cache)
        bits[lam] = info["expected_bits"]
    assert bits[0.0] == pytest.approx(2.0)
    assert bits[0.0] < bits[0.9] <= bits[1.0]
    s = torch.load(cache)
    assert s["S"].shape == (4, 4, 4, 3) and torch.all(s["S"][:, :, 0] == 0) and torch.all(s["S"][..., 0] == 0)
    predicted = float((s["S"][..., 2] - s["S"][..., 1]).sum())
    actual = float((s["nll"][:, 1] - s["nll"][:, 0]).sum())
    assert actual > 0 and abs(predicted - actual) <= 0.2 * actual
    r2, i2 = run(tiny, None, objective="linear", pool=4, batch=4, steps=30, lam=1.0, sens_cache=cache)
    assert torch.equal(router.w3, r2.w3) and i2["expected_bits"] == bits[1.0]
