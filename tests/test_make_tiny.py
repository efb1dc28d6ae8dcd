"""test_make_tiny.py — the synthetic-model makers in models/: make_tiny.py and make_bad.py.

Checks with the gguf package (not libmoqae) that tiny models carry llama.cpp's llama keys, tensor
names, shapes and types for every --wtype, that a seed reproduces the file byte for byte, and that
make_bad.py patches the field it claims to. Runs offline in about a second; the real model
(fetch_model.py) is only checked when it is already in the cache.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

import gguf
from gguf.quants import dequantize

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))

import fetch_model  # noqa: E402
import make_bad  # noqa: E402
from make_tiny import WTYPES, make_tiny  # noqa: E402

LLAMA_KEYS = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon",
              "rope.dimension_count", "vocab_size")
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")


def _field(r: gguf.GGUFReader, key: str):
    return r.fields[key].contents()


@pytest.mark.parametrize("wtype", list(WTYPES))
def test_shapes_and_types(wtype, tmp_path):
    cfg = make_tiny(tmp_path / "t.gguf", vocab="bytes", wtype=wtype)
    r = gguf.GGUFReader(tmp_path / "t.gguf")
    assert _field(r, "general.architecture") == "llama"
    for k in LLAMA_KEYS:
        assert f"llama.{k}" in r.fields, k
    assert _field(r, "llama.vocab_size") == cfg.n_vocab == len(r.fields["tokenizer.ggml.tokens"].data)
    assert _field(r, "llama.rope.dimension_count") == cfg.n_embd // cfg.n_head
    t = {x.name: x for x in r.tensors}
    e, f, kv = cfg.n_embd, cfg.n_ff, cfg.n_head_kv * cfg.head_dim
    want = {"token_embd.weight": [e, cfg.n_vocab], "output_norm.weight": [e], "output.weight": [e, cfg.n_vocab]}
    for i in range(cfg.n_layer):
        want.update({f"blk.{i}.attn_norm.weight": [e], f"blk.{i}.attn_q.weight": [e, e],
                     f"blk.{i}.attn_k.weight": [e, kv], f"blk.{i}.attn_v.weight": [e, kv],
                     f"blk.{i}.attn_output.weight": [e, e], f"blk.{i}.ffn_norm.weight": [e],
                     f"blk.{i}.ffn_gate.weight": [e, f], f"blk.{i}.ffn_up.weight": [e, f],
                     f"blk.{i}.ffn_down.weight": [f, e]})
    assert set(t) == set(want)
    for name, ne in want.items():
        assert [int(n) for n in t[name].shape] == ne, name
        expect = gguf.GGMLQuantizationType.F32 if len(ne) == 1 else WTYPES[wtype]
        assert t[name].tensor_type == expect, name
    x = dequantize(t["blk.0.attn_q.weight"].data, t["blk.0.attn_q.weight"].tensor_type)
    assert 0.5 / np.sqrt(e) < float(np.std(x)) < 2.0 / np.sqrt(e)
    norm = dequantize(t["output_norm.weight"].data, gguf.GGMLQuantizationType.F32)
    assert abs(float(np.mean(norm)) - 1.0) < 0.1


def test_deterministic_and_tied(tmp_path):
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    make_tiny(a, vocab="bytes", wtype="q4_1", seed=7)
    make_tiny(b, vocab="bytes", wtype="q4_1", seed=7)
    make_tiny(c, vocab="bytes", wtype="q4_1", seed=8)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, c)]
    assert digest[0] == digest[1] != digest[2]
    make_tiny(a, vocab="bytes", tied=True)
    assert "output.weight" not in {x.name for x in gguf.GGUFReader(a).tensors}


def test_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        make_tiny(tmp_path / "x.gguf", vocab="bytes", wtype="q4_0", n_embd=48, n_head=4)
    with pytest.raises(ValueError, match="n_head_kv"):
        make_tiny(tmp_path / "x.gguf", vocab="bytes", n_head=4, n_head_kv=3)
    assert not (tmp_path / "x.gguf").exists()


def test_make_bad_patches(tmp_path):
    good = tmp_path / "good.gguf"
    make_tiny(good, vocab="bytes", wtype="q8_0")
    lay = make_bad.layout(good.read_bytes())
    assert lay.data_end() <= lay.size
    paths = make_bad.make_all(good, tmp_path / "bad")
    assert set(paths) == set(make_bad.MAKERS)
    assert paths["wrong_magic"].read_bytes()[:4] != b"GGUF"
    assert paths["truncated"].stat().st_size < good.stat().st_size
    bad = make_bad.layout(paths["unknown_type"].read_bytes())
    assert bad.tensors["blk.0.attn_q.weight"].type == 1234
    bad = make_bad.layout(paths["absurd_dims"].read_bytes())
    assert bad.tensors["token_embd.weight"].ne[-1] == 1 << 62
    bad = make_bad.layout(paths["offset_past_end"].read_bytes())
    assert bad.data_offset + bad.tensors["output_norm.weight"].offset >= bad.size
    r = gguf.GGUFReader(paths["missing_key"])
    assert "llama.block_count" not in r.fields
    r = gguf.GGUFReader(paths["nan_weights"])
    t = next(x for x in r.tensors if x.name == "output_norm.weight")
    assert np.isnan(dequantize(t.data, t.tensor_type)).all()


def test_fetch_model_cached():
    """Only when SmolLM2 is already cached: the suite never downloads (tests needing it fetch it)."""
    spec = fetch_model.MODELS["smollm2"]
    cached = fetch_model.cache_dir() / spec.filename
    if not cached.is_file():
        pytest.skip(f"{cached} not fetched (python models/fetch_model.py)")
    path = Path(fetch_model.smollm2_path())
    assert path.is_absolute() and path.stat().st_size == spec.size
    r = gguf.GGUFReader(path)
    assert _field(r, "llama.block_count") == 30
