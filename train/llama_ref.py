"""Reference llama forward pass in NumPy (float64 by default), the numerical oracle for the C
runtime on small models: weights are dequantized from the same GGUF with the `gguf` package, RoPE on
adjacent pairs (GGUF's llama layout), grouped-query causal attention, SwiGLU FFN, RMSNorm, tied or
separate output. It implements the attention rule of DESIGN.md with an exact (unquantized) KV cache.
Names follow the C side (n_embd, n_head, n_head_kv, head_dim, n_ff, n_rot).

TODO(issue 5): a PyTorch version of this forward with the KV codecs simulated bit for bit.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


@dataclasses.dataclass
class HParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_rot: int
    rope_base: float
    rms_eps: float


def _field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class LlamaRef:
    def __init__(self, path: str, dtype=np.float64):
        r = GGUFReader(path)
        arch = _field(r, "general.architecture")
        assert arch == "llama", arch
        n_embd = int(_field(r, "llama.embedding_length"))
        n_head = int(_field(r, "llama.attention.head_count"))
        self.hp = HParams(
            n_vocab=len(r.fields["tokenizer.ggml.tokens"].data),
            n_embd=n_embd,
            n_layer=int(_field(r, "llama.block_count")),
            n_head=n_head,
            n_head_kv=int(_field(r, "llama.attention.head_count_kv", n_head)),
            head_dim=n_embd // n_head,
            n_ff=int(_field(r, "llama.feed_forward_length")),
            n_rot=int(_field(r, "llama.rope.dimension_count", n_embd // n_head)),
            rope_base=float(_field(r, "llama.rope.freq_base", 10000.0)),
            rms_eps=float(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        )
        self.w = {}
        for t in r.tensors:
            a = dequantize(t.data, t.tensor_type)
            shape = tuple(int(x) for x in reversed(t.shape))  # outermost first
            self.w[t.name] = np.asarray(a, dtype=np.float32).reshape(shape).astype(dtype)
        self.dtype = dtype

    def _rms_norm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.hp.rms_eps) * w

    def _rope(self, x, pos):
        """x: [T][n_heads][head_dim]; rotates pairs (2i, 2i+1) of the first n_rot dims."""
        hp = self.hp
        half = hp.n_rot // 2
        inv = hp.rope_base ** (-2.0 * np.arange(half) / hp.n_rot)
        ang = np.asarray(pos)[:, None] * inv[None, :]  # [T][half]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        y = x.copy()
        x0, x1 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        y[..., 0:2 * half:2] = x0 * c - x1 * s
        y[..., 1:2 * half:2] = x0 * s + x1 * c
        return y

    def forward(self, tokens) -> np.ndarray:
        """Logits [T][n_vocab] for a sequence starting at position 0."""
        hp = self.hp
        T = len(tokens)
        pos = np.arange(T)
        x = self.w["token_embd.weight"][np.asarray(tokens)]
        mask = np.triu(np.full((T, T), -np.inf), 1)
        group = hp.n_head // hp.n_head_kv
        for il in range(hp.n_layer):
            p = f"blk.{il}."
            xn = self._rms_norm(x, self.w[p + "attn_norm.weight"])
            q = (xn @ self.w[p + "attn_q.weight"].T).reshape(T, hp.n_head, hp.head_dim)
            k = (xn @ self.w[p + "attn_k.weight"].T).reshape(T, hp.n_head_kv, hp.head_dim)
            v = (xn @ self.w[p + "attn_v.weight"].T).reshape(T, hp.n_head_kv, hp.head_dim)
            q, k = self._rope(q, pos), self._rope(k, pos)
            out = np.empty_like(q)
            for h in range(hp.n_head):
                s = q[:, h, :] @ k[:, h // group, :].T / np.sqrt(hp.head_dim) + mask
                s = np.exp(s - s.max(axis=1, keepdims=True))
                s /= s.sum(axis=1, keepdims=True)
                out[:, h, :] = s @ v[:, h // group, :]
            x = x + out.reshape(T, -1) @ self.w[p + "attn_output.weight"].T
            xn = self._rms_norm(x, self.w[p + "ffn_norm.weight"])
            g = xn @ self.w[p + "ffn_gate.weight"].T
            u = xn @ self.w[p + "ffn_up.weight"].T
            x = x + (g / (1.0 + np.exp(-g)) * u) @ self.w[p + "ffn_down.weight"].T
        xn = self._rms_norm(x, self.w["output_norm.weight"])
        out_w = self.w.get("output.weight", self.w["token_embd.weight"])
        return xn @ out_w.T
