"""Real K/V from a llama GGUF for the KV-codec measurements of docs/KV-CODECS.md: a float32 PyTorch
forward (weights dequantized with the `gguf` package, same maths as train/llama_ref.py) that returns,
per layer, the queries (after RoPE), the keys before and after RoPE and the values, and that can run
with a KV transform applied under DESIGN.md's attention rule (earlier complete chunks as the codec
decodes them, the token's own chunk exact) to measure perplexity per codec variant.
Not the training forward (that is the lead's train/ reference); tokenization goes through the
runtime's own tokenizer (build/tokenize-dump).

  python train/kv_dump.py -m MODEL.gguf --text wiki.valid.raw -n 512 -o kv.npz   # dump K/V
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import tempfile

import numpy as np
import torch
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


def _field(r: GGUFReader, key: str, default=None):
    f = r.fields.get(key)
    return default if f is None else f.contents()


class LlamaTorch:
    """float32 llama forward; rope on adjacent pairs (GGUF's llama layout), GQA, SwiGLU, RMSNorm."""

    def __init__(self, path: str):
        r = GGUFReader(path)
        assert _field(r, "general.architecture") == "llama"
        n_embd = int(_field(r, "llama.embedding_length"))
        n_head = int(_field(r, "llama.attention.head_count"))
        self.hp = HParams(
            n_vocab=len(r.fields["tokenizer.ggml.tokens"].data), n_embd=n_embd,
            n_layer=int(_field(r, "llama.block_count")), n_head=n_head,
            n_head_kv=int(_field(r, "llama.attention.head_count_kv", n_head)), head_dim=n_embd // n_head,
            n_ff=int(_field(r, "llama.feed_forward_length")),
            n_rot=int(_field(r, "llama.rope.dimension_count", n_embd // n_head)),
            rope_base=float(_field(r, "llama.rope.freq_base", 10000.0)),
            rms_eps=float(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)))
        self.w = {}
        for t in r.tensors:
            a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            self.w[t.name] = torch.from_numpy(a.reshape(tuple(int(x) for x in reversed(t.shape))).copy())

    def _norm(self, x, w):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.hp.rms_eps) * w

    def rope(self, x, pos):
        """x: [T][heads][head_dim]; rotates pairs (2i, 2i+1) of the first n_rot dims by pos*theta_i."""
        hp = self.hp
        half = hp.n_rot // 2
        inv = hp.rope_base ** (-2.0 * np.arange(half) / hp.n_rot)
        ang = np.asarray(pos, dtype=np.float64)[:, None] * inv[None, :]
        c = torch.from_numpy(np.cos(ang).astype(np.float32))[:, None, :]
        s = torch.from_numpy(np.sin(ang).astype(np.float32))[:, None, :]
        y = x.clone()
        x0, x1 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        y[..., 0:2 * half:2] = x0 * c - x1 * s
        y[..., 1:2 * half:2] = x0 * s + x1 * c
        return y

    @torch.no_grad()
    def forward(self, tokens, kv_fn=None, chunk: int = 32, capture: bool = False):
        """Logits [T][n_vocab]. kv_fn(layer, k_pre, k_post, v) -> (k_used, v_used), all [T][n_head_kv][head_dim]:
        what a query sees for keys/values of earlier complete chunks (its own chunk stays exact).
        capture: also return per-layer dicts q, k_pre, k_post, v."""
        hp = self.hp
        T = len(tokens)
        pos = np.arange(T)
        x = self.w["token_embd.weight"][torch.as_tensor(np.asarray(tokens))]
        qi = torch.arange(T)[:, None]
        kj = torch.arange(T)[None, :]
        causal = kj <= qi
        same = (kj // chunk) == (qi // chunk)
        group = hp.n_head // hp.n_head_kv
        caps = []
        for il in range(hp.n_layer):
            p = f"blk.{il}."
            xn = self._norm(x, self.w[p + "attn_norm.weight"])
            q = (xn @ self.w[p + "attn_q.weight"].T).reshape(T, hp.n_head, hp.head_dim)
            k_pre = (xn @ self.w[p + "attn_k.weight"].T).reshape(T, hp.n_head_kv, hp.head_dim)
            v = (xn @ self.w[p + "attn_v.weight"].T).reshape(T, hp.n_head_kv, hp.head_dim)
            q, k = self.rope(q, pos), self.rope(k_pre, pos)
            if capture:
                caps.append({"q": q.clone(), "k_pre": k_pre.clone(), "k_post": k.clone(), "v": v.clone()})
            kq, vq = (k, v) if kv_fn is None else kv_fn(il, k_pre, k, v)
            hk = torch.arange(hp.n_head) // group
            qh = q.permute(1, 0, 2)  # [H][T][D]
            s_ex = qh @ k[:, hk, :].permute(1, 2, 0)
            s_q = qh @ kq[:, hk, :].permute(1, 2, 0)
            s = torch.where(same, s_ex, s_q) / np.sqrt(hp.head_dim)
            s = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
            o = (s * same) @ v[:, hk, :].permute(1, 0, 2) + (s * ~same) @ vq[:, hk, :].permute(1, 0, 2)
            x = x + o.permute(1, 0, 2).reshape(T, -1) @ self.w[p + "attn_output.weight"].T
            xn = self._norm(x, self.w[p + "ffn_norm.weight"])
            g = xn @ self.w[p + "ffn_gate.weight"].T
            u = xn @ self.w[p + "ffn_up.weight"].T
            x = x + (torch.nn.functional.silu(g) * u) @ self.w[p + "ffn_down.weight"].T
        xn = self._norm(x, self.w["output_norm.weight"])
        logits = xn @ self.w.get("output.weight", self.w["token_embd.weight"]).T
        return (logits, caps) if capture else logits


def tokenize(model: str, text: bytes, tool: str) -> list:
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(text)
    try:
        out = subprocess.run([tool, model, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return [int(t) for t in out.split()]


def nll(logits, tokens, first: int = 0) -> tuple:
    """Sum of -log p(token[t+1]) for t >= first, and the count."""
    lp = torch.log_softmax(logits[:-1].double(), dim=-1)
    tgt = torch.as_tensor(np.asarray(tokens[1:]))
    v = -lp[torch.arange(len(tokens) - 1), tgt][first:]
    return float(v.sum()), int(v.numel())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("-n", type=int, default=512, help="tokens")
    ap.add_argument("--offset", type=int, default=0, help="byte offset into the text")
    ap.add_argument("--tokenizer", default="build/tokenize-dump")
    ap.add_argument("-o", "--out", required=True, help=".npz with q, k_pre, k_post, v: [n_layer][T][heads][head_dim]")
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with open(a.text, "rb") as f:
        f.seek(a.offset)
        text = f.read(a.n * 8)
    toks = tokenize(a.model, text, a.tokenizer)[: a.n]
    m = LlamaTorch(a.model)
    _, caps = m.forward(toks, capture=True)
    np.savez(a.out, tokens=np.asarray(toks), **{k: np.stack([c[k].numpy() for c in caps]) for k in caps[0]})


if __name__ == "__main__":
    main()
