"""reference.py — THE PyTorch reference llama forward of moqae.cpp: the numerical oracle for the C
runtime (tests/test_model.py, tests/test_reference_parity.py) and the forward that router training
differentiates through (train/train_router.py). Weights are dequantized from the same GGUF with the
`gguf` package; names follow the C side (n_embd, n_head, n_head_kv, head_dim, n_ff, n_rot).

The KV cache follows DESIGN.md's attention rule exactly as runtime/src/kv-cache.h states it: a token
attends to every earlier COMPLETED chunk of C tokens as that chunk's codec decodes it (train/kv_codec.py,
byte-exact with runtime/src/kv-codec.c) and to the tokens of its own chunk, up to itself, rounded to f16
(the residual window). What a completed chunk holds is decided in one place, `codec_noise`, over
`stored_kv`'s f16 values: keys before RoPE (key_store 'pre', the runtime's default: a quantized record
holds R(-p)·f16(K) rotated with the ring's own tables, and the key used is R(p)·dec(enc(R(-p)·f16(K))))
or after RoPE (key_store 'post', MOQAE_KV_KEYS=post in the runtime); FP16 records and the residual window
hold f16(K) after RoPE either way. The codec of each (chunk, layer) comes from a fixed policy, a router
file (train/router.py, docs/ROUTER-FORMAT.md), or, for training, a soft mixture of the experts (SoftKV).
Vectorised: one masked attention over two key sets (decoded keys of completed chunks, exact keys of the
own chunk), every chunk's records coded at once.

The chunks are coded by train/kv_codec.py (the PyTorch oracle) or, with codec 'c' / MOQAE_REF_CODEC=c, by
the runtime's own encoder through build/kv-codec-dump: the same bytes (tests/test_kv_codec.py), faster.

Also simulated (act_quant=True, the default): the runtime converts each weight product's input to the
weight's vec_dot type as ggml does (Q8_0 for Q4_0/Q8_0 weights, Q8_1 for Q4_1: 8-bit blocks of 32 with
an f16 scale; F16/BF16 weights: inputs rounded to f16/bf16; F32: none), `act_quant` below. What remains
between the runtime and this reference is summation order (docs/RESULTS.md, "Parity: PyTorch reference
vs runtime").

  python train/eval_ppl.py -m MODEL.gguf -f wiki.test.raw -c 512 --chunks 16 --kv sink+int4   # the CLI
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import struct
import subprocess
import tempfile

# Before torch is imported: OpenMP threads that sleep when idle instead of spinning. With active waiting
# (libgomp's default) every op of a 2-thread run stalls whenever another process holds a core: 6-10x
# slower on this shared 2-core machine (docs/TRAINING.md, "Cost").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from gguf.quants import dequantize

import kv_codec

CODECS = ("fp16", "int8", "int4", "int2")  # index = enum moqae_kv_codec (F16, Q8, Q4, Q2)
CODEC_INDEX = {c: i for i, c in enumerate(CODECS)}
# --kv POLICY -> (codec of every chunk, chunk 0 in FP16): the runtime's moqae_kv_policy_parse
POLICIES = {"fp16": ("fp16", False), "int8": ("int8", False), "int4": ("int4", False), "int2": ("int2", False),
            "sink+int8": ("int8", True), "sink+int4": ("int4", True), "sink+int2": ("int2", True)}
KEY_STORES = ("pre", "post")  # quantized records hold keys before RoPE (the runtime's default) or after

# ================================================================================================
# GGUF
# ================================================================================================

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf(path: str):
    """A quick GGUF reader (gguf-py's GGUFReader takes ~10 s on SmolLM2's vocabulary): returns
    (metadata {key: scalar, string, or array length}, tensors {name: (raw uint8 rows, type, shape outermost
    first)}). Arrays are skipped, only their length kept. Offsets and sizes are checked against the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    buf = np.memmap(path, dtype=np.uint8, mode="r")
    mv = memoryview(buf)
    if bytes(mv[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    _version, n_tensors, n_kv = struct.unpack_from("<IQQ", mv, 4)
    off = 24

    def read_str(o):
        (n,) = struct.unpack_from("<Q", mv, o)
        if o + 8 + n > len(buf):
            raise ValueError(f"{path}: string past the end of the file")
        return bytes(mv[o + 8:o + 8 + n]).decode("utf-8", "replace"), o + 8 + n

    def read_val(t, o):
        if t in _SCALAR:
            (v,) = struct.unpack_from(_SCALAR[t], mv, o)
            return v, o + struct.calcsize(_SCALAR[t])
        if t == 8:
            return read_str(o)
        if t == 9:
            et, n = struct.unpack_from("<IQ", mv, o)
            o += 12
            if et in _SCALAR:
                return n, o + n * struct.calcsize(_SCALAR[et])
            for _ in range(n):
                _, o = read_val(et, o)
            return n, o
        raise ValueError(f"{path}: bad GGUF value type {t}")

    meta = {}
    for _ in range(n_kv):
        key, off = read_str(off)
        (t,) = struct.unpack_from("<I", mv, off)
        meta[key], off = read_val(t, off + 4)
    infos = []
    for _ in range(n_tensors):
        name, off = read_str(off)
        (nd,) = struct.unpack_from("<I", mv, off)
        dims = struct.unpack_from(f"<{nd}Q", mv, off + 4)
        t, o = struct.unpack_from("<IQ", mv, off + 4 + 8 * nd)
        off += 4 + 8 * nd + 12
        infos.append((name, dims, t, o))
    align = int(meta.get("general.alignment", 32))
    base = (off + align - 1) // align * align
    tensors = {}
    for name, dims, t, o in infos:
        bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType(t)]
        row_bytes = dims[0] // bs * ts
        rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
        if base + o + rows * row_bytes > len(buf):
            raise ValueError(f"{path}: tensor {name} runs past the end of the file")
        raw = buf[base + o:base + o + rows * row_bytes].reshape(rows, row_bytes)
        tensors[name] = (raw, GGMLQuantizationType(t), tuple(int(x) for x in reversed(dims)))
    return meta, tensors


def model_fingerprint(path: str) -> str:
    """docs/ROUTER-FORMAT.md's base.fingerprint: SHA-256 of the raw data bytes of token_embd.weight, as
    stored in the model GGUF."""
    _, tensors = read_gguf(path)
    raw = tensors["token_embd.weight"][0]
    return hashlib.sha256(np.ascontiguousarray(raw).data).hexdigest()


# ================================================================================================
# the model
# ================================================================================================

# weight type -> the conversion of the products' inputs (runtime/src/cpu/kernels-ref.c's vec_dot_type)
ACT_MODES = {"Q4_0": "q8_0", "Q8_0": "q8_0", "Q4_1": "q8_1", "F16": "f16", "BF16": "bf16", "F32": "none"}


def _round_away(y: torch.Tensor) -> torch.Tensor:
    """C's roundf (halves away from zero), exactly: floor(|y| + 0.5) is exact in f32 for every |y| >= 0.5
    (the sum stays in |y|'s binade or the next, whose grid holds it), and below 0.5 the answer is 0 (the
    f32 sum 0.49999997 + 0.5 would round up to 1)."""
    a = y.abs()
    r = (a + 0.5).floor_()
    return r.masked_fill_(a < 0.5, 0.0).copysign_(y)


def act_quant(x: torch.Tensor, mode: str):
    """(x as the runtime's from_float for the weight's vec_dot type sees it, dequantized, with a
    straight-through gradient; for q8_1 also the block-sum correction [..., n/32], else None).
    q8_0/q8_1 (ggml quantize_row_q8_0/1_ref): per block of 32, d = amax/127, q = roundf(x * (1/d)), value
    q * f16(d). Q8_1 also stores s = f16(d * sum q), which multiplies Q4_1's block offsets m in the dot
    product: the correction s - f16(d) * sum q makes the offsets' term exact (LlamaModel.lin).
    f16/bf16: rounded. n must be a multiple of 32 for the q8 modes (ggml's requirement too)."""
    if mode == "none":
        return x, None
    corr = None
    with torch.no_grad():
        if mode in ("f16", "bf16"):
            y = x.to(torch.float16 if mode == "f16" else torch.bfloat16).to(x.dtype)
        else:
            xb = (x if x.dtype == torch.float32 else x.float()).reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
            d = xb.abs().amax(-1, keepdim=True) / 127.0
            inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), 0.0)
            q = _round_away(xb * inv)
            dh = d.to(torch.float16).float()
            y = (q * dh).reshape(x.shape).to(x.dtype)
            if mode == "q8_1":
                qs = q.sum(-1, keepdim=True)
                corr = ((qs * d).to(torch.float16).float() - dh * qs)[..., 0].to(x.dtype)
    return (x + (y - x).detach() if x.requires_grad else y), corr


@dataclasses.dataclass
class HParams:
    arch: str
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


def _f16(x: torch.Tensor) -> torch.Tensor:
    """x rounded to f16, kept in x's dtype (the gradient passes through the cast unchanged)."""
    return x.to(torch.float16).to(x.dtype)


class LlamaModel:
    """A llama GGUF's weights (frozen, `dtype`) and the forward pass. n_layer: load only the first
    n_layer blocks (then there are no logits: quick tests of K/V); token_ids: dequantize only these rows
    of the embedding (the other rows are 0)."""

    def __init__(self, path: str, dtype=torch.float32, device="cpu", n_layer: int | None = None, token_ids=None,
                 act_quant: bool = True):
        meta, tensors = read_gguf(path)
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"{path}: architecture {arch!r}: the reference implements llama only")
        n_embd = int(meta["llama.embedding_length"])
        n_head = int(meta["llama.attention.head_count"])
        self.path = path
        self.meta = meta
        self.hp = HParams(
            arch=arch, n_vocab=int(meta["tokenizer.ggml.tokens"]), n_embd=n_embd,
            n_layer=int(meta["llama.block_count"]), n_head=n_head,
            n_head_kv=int(meta.get("llama.attention.head_count_kv", n_head)), head_dim=n_embd // n_head,
            n_ff=int(meta["llama.feed_forward_length"]),
            n_rot=int(meta.get("llama.rope.dimension_count", n_embd // n_head)),
            rope_base=float(meta.get("llama.rope.freq_base", 10000.0)),
            rms_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)))
        self.n_layer_full = self.hp.n_layer
        truncated = n_layer is not None and n_layer < self.hp.n_layer
        if n_layer is not None:
            self.hp.n_layer = min(n_layer, self.hp.n_layer)
        self.dtype, self.device = dtype, torch.device(device)
        self.w = {}
        self.act = {}  # weight name -> how the runtime converts that product's input (ACT_MODES)
        self.w_min = {}  # Q4_1 weight name -> its block offsets m [rows][n_cols/32] (the q8_1 correction)
        for name, (raw, ttype, shape) in tensors.items():
            self.act[name] = ACT_MODES.get(ttype.name, "none") if act_quant else "none"
            if self.act[name] == "q8_1" and ttype.name == "Q4_1" and len(shape) == 2:
                m = np.ascontiguousarray(np.asarray(raw).reshape(shape[0], -1, 20)[:, :, 2:4]).view(np.float16)
                self.w_min[name] = torch.from_numpy(m[..., 0].astype(np.float32)).to(dtype=dtype, device=device)
            if name.startswith("blk.") and int(name.split(".")[1]) >= self.hp.n_layer:
                continue
            if truncated and name in ("output.weight", "output_norm.weight"):
                continue
            if token_ids is not None and name == "token_embd.weight":
                ids = np.unique(np.asarray(token_ids))
                rows = np.asarray(dequantize(np.asarray(raw[ids]), ttype), dtype=np.float32).reshape(len(ids), -1)
                full = torch.zeros(shape, dtype=torch.float32)
                full[torch.from_numpy(ids)] = torch.from_numpy(rows)
                self.w[name] = full.to(dtype=dtype, device=self.device)
                continue
            a = np.asarray(dequantize(np.asarray(raw), ttype), dtype=np.float32).reshape(shape)
            self.w[name] = torch.from_numpy(a.copy()).to(dtype=dtype, device=self.device)

    # ---- pieces -----------------------------------------------------------------------------------

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """[..., T] token ids -> [..., T, n_embd]: layer 0's input (and the version-1 router's)."""
        return self.w["token_embd.weight"][tokens.to(self.device)]

    def lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x @ W(name).T with x converted as the runtime converts it for that weight (straight-through)."""
        xq, corr = act_quant(x, self.act.get(name, "none"))
        y = F.linear(xq, self.w[name])
        if corr is not None and name in self.w_min:
            y = y + F.linear(corr, self.w_min[name])
        return y

    def _norm(self, x, w):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.hp.rms_eps) * w

    def rope_table(self, T: int, pos0: int = 0):
        """cos, sin [T][n_rot/2] for positions pos0.., computed as graph.c (and ggml) do: theta = pos, then
        theta *= base^(-2/n_rot) per pair, in f32, so the angles match the runtime's to the last bit."""
        half = self.hp.n_rot // 2
        scale = torch.tensor(self.hp.rope_base, dtype=torch.float32).pow(-2.0 / self.hp.n_rot)
        theta = torch.arange(pos0, pos0 + T, dtype=torch.float32)
        cols = []
        for _ in range(half):
            cols.append(theta)
            theta = theta * scale
        ang = torch.stack(cols, dim=1)
        return (ang.cos().to(self.dtype).to(self.device), ang.sin().to(self.dtype).to(self.device))

    def rope(self, x: torch.Tensor, cs) -> torch.Tensor:
        """x: [..., T, heads, head_dim]; rotates pairs (2i, 2i+1) of the first n_rot dims (GGUF's llama
        layout, graph.c's rope_head)."""
        c, s = cs[0][:, None, :], cs[1][:, None, :]
        n2 = self.hp.n_rot
        x0, x1 = x[..., 0:n2:2], x[..., 1:n2:2]
        y = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
        return y if n2 == x.shape[-1] else torch.cat([y, x[..., n2:]], dim=-1)

    # ---- the forward ------------------------------------------------------------------------------

    def forward(self, tokens, kv: "KVRule | None" = None, logits_rows: slice | None = None, capture: bool = False):
        """Logits [B][rows][n_vocab] (no B for 1-D tokens) of a sequence starting at position 0.
        tokens: [T] or [B][T] ids. kv: None = an exact f32 KV cache (plain causal attention), or a
        KVRule (HardKV: codecs per chunk and layer; SoftKV: the training mixture). logits_rows: the rows
        to compute (default all). capture: also return per-layer dicts q, k_pre, k_post, v ([B][T][heads][D])."""
        hp = self.hp
        tok = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens, dtype=torch.long)
        squeeze = tok.dim() == 1
        tok = tok.reshape(-1, tok.shape[-1])
        B, T = tok.shape
        x = self.embed(tok)
        cs = self.rope_table(T)
        caps = []
        for il in range(hp.n_layer):
            p = f"blk.{il}."
            xn = self._norm(x, self.w[p + "attn_norm.weight"])
            q = self.lin(xn, p + "attn_q.weight").reshape(B, T, hp.n_head, hp.head_dim)
            k_pre = self.lin(xn, p + "attn_k.weight").reshape(B, T, hp.n_head_kv, hp.head_dim)
            v = self.lin(xn, p + "attn_v.weight").reshape(B, T, hp.n_head_kv, hp.head_dim)
            q, k_post = self.rope(q, cs), self.rope(k_pre, cs)
            if capture:
                caps.append({"q": q.detach().clone(), "k_pre": k_pre.detach().clone(),
                             "k_post": k_post.detach().clone(), "v": v.detach().clone()})
            o = self._attention(il, q, k_pre, k_post, v, kv, cs)
            x = x + self.lin(o.reshape(B, T, -1), p + "attn_output.weight")
            xn = self._norm(x, self.w[p + "ffn_norm.weight"])
            g = self.lin(xn, p + "ffn_gate.weight")
            u = self.lin(xn, p + "ffn_up.weight")
            x = x + self.lin(F.silu(g) * u, p + "ffn_down.weight")
        logits = None
        if "output_norm.weight" in self.w:  # absent in a truncated model (n_layer)
            xs = x if logits_rows is None else x[:, logits_rows]
            xn = self._norm(xs, self.w["output_norm.weight"])
            logits = self.lin(xn, "output.weight" if "output.weight" in self.w else "token_embd.weight")
            if squeeze:
                logits = logits[0]
        if capture:
            if squeeze:
                caps = [{k: t[0] for k, t in c.items()} for c in caps]
            return logits, caps
        return logits

    def _attention(self, il, q, k_pre, k_post, v, kv, cs):
        """[B][T][n_head][D] attention output of layer il under the attention rule (kv-cache.h)."""
        hp = self.hp
        B, T = q.shape[:2]
        scale = 1.0 / math.sqrt(hp.head_dim)
        qh = q.transpose(1, 2)  # [B][H][T][D]
        if kv is None:  # exact f32 cache
            o = F.scaled_dot_product_attention(qh, k_post.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               scale=scale, enable_gqa=True)
            return o.transpose(1, 2)
        k_own, v_own, dec = kv.key_sets(self, il, k_pre, k_post, v, cs)
        if dec is None:  # every chunk FP16: decoded == stored, one key set
            o = F.scaled_dot_product_attention(qh, k_own.transpose(1, 2), v_own.transpose(1, 2), is_causal=True,
                                               scale=scale, enable_gqa=True)
            return o.transpose(1, 2)
        k_dec, vd = dec
        keys = torch.cat([k_dec, k_own], dim=1).transpose(1, 2)  # [B][Hkv][2T][D]
        vals = torch.cat([vd, v_own], dim=1).transpose(1, 2)
        o = F.scaled_dot_product_attention(qh, keys, vals, attn_mask=two_set_mask(T, kv.chunk, q.device),
                                           scale=scale, enable_gqa=True)
        return o.transpose(1, 2)


# ================================================================================================
# the KV cache: what is stored, and what a query sees
# ================================================================================================

def default_key_store() -> str:
    """Where the runtime quantizes keys unless told otherwise: before RoPE ('pre'); MOQAE_KV_KEYS=post
    (the runtime's own switch, api.c) stores them after RoPE."""
    return "post" if os.environ.get("MOQAE_KV_KEYS") == "post" else "pre"


def stored_kv(k_post: torch.Tensor, v: torch.Tensor):
    """The K and V the ring holds for each token, [B][T][Hkv][D]: after RoPE, rounded to f16 (kv-ring.c's
    to_f16_precision). The residual window keeps exactly these; completed chunks are encoded from them
    (ring_records)."""
    return _f16(k_post), _f16(v)


class RingRope:
    """kv-ring.c's rotation tables for keys stored before RoPE: theta_i = f32(base^(-2i/n_rot)) (0 for the
    pairs past n_rot), cos/sin computed in double and rounded to f32 for the chunk starts P0 (p0: [n_c][D/2])
    and for the offsets t < C in a chunk (t: [C][D/2]), pairs (2i, 2i+1)."""

    def __init__(self, hp: HParams, C: int, n_c: int, device, dtype):
        half = hp.head_dim // 2
        th = np.zeros(half)
        i = np.arange(hp.n_rot // 2)
        th[:len(i)] = np.array([np.float32(math.pow(hp.rope_base, -2.0 * k / hp.n_rot)) for k in i], dtype=np.float64)

        def cs(pos):
            a = pos[:, None] * th[None, :]
            return tuple(torch.from_numpy(f(a).astype(np.float32)).to(device=device, dtype=dtype) for f in (np.cos, np.sin))
        self.p0 = cs(np.arange(n_c, dtype=np.float64) * C)
        self.t = cs(np.arange(C, dtype=np.float64))

    @staticmethod
    def _turn(x, c, s, sign):
        """R(sign * a) x on pairs (2i, 2i+1), f32 as kv-ring.c's unrotate (sign -1)."""
        x0, x1 = x[..., 0::2], x[..., 1::2]
        if sign < 0:
            y = (x0 * c + x1 * s, x1 * c - x0 * s)
        else:
            y = (x0 * c - x1 * s, x0 * s + x1 * c)
        return torch.stack(y, dim=-1).flatten(-2)

    def to_pre(self, r: torch.Tensor, chunk_idx: torch.Tensor) -> torch.Tensor:
        """Records [N][H][C][D] of keys after RoPE (chunks chunk_idx [N]) -> R(-t) R(-P0) k, as encoded."""
        c0, s0 = self.p0[0][chunk_idx][:, None, None], self.p0[1][chunk_idx][:, None, None]
        y = self._turn(r, c0, s0, -1)
        return self._turn(y, self.t[0][None, None], self.t[1][None, None], -1)

    def to_post(self, r: torch.Tensor, chunk_idx: torch.Tensor) -> torch.Tensor:
        """The keys a query uses from decoded records before RoPE: R(P0) R(t) k (the score kernels rotate the
        query by -P0 and the key by t: the same product)."""
        y = self._turn(r, self.t[0][None, None], self.t[1][None, None], 1)
        c0, s0 = self.p0[0][chunk_idx][:, None, None], self.p0[1][chunk_idx][:, None, None]
        return self._turn(y, c0, s0, 1)


def two_set_mask(T: int, C: int, device=None) -> torch.Tensor:
    """[T][2T] bool: query i sees decoded key j (first T columns) when j's chunk is an earlier, complete
    chunk (a complete chunk is any chunk before i's), and exact key T+j when j is in i's chunk and j <= i."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return torch.cat([(j // C) < (i // C), ((j // C) == (i // C)) & (j <= i)], dim=1)


def v_group(head_dim: int) -> int:
    """The value group the runtime uses (kv-ring.c): 32, or the whole head when 32 does not divide it."""
    return kv_codec.V_GROUP if head_dim % kv_codec.V_GROUP == 0 else head_dim


def _records(x: torch.Tensor, n_c: int, C: int) -> torch.Tensor:
    """[B][T][H][D] -> [B][n_c][H][C][D], the records of the n_c complete chunks."""
    B, _, H, D = x.shape
    return x[:, :n_c * C].reshape(B, n_c, C, H, D).transpose(2, 3)


def _unrecords(r: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of _records, the rows after the complete chunks taken from `like` (never seen decoded)."""
    B, n_c, H, C, D = r.shape
    y = r.transpose(2, 3).reshape(B, n_c * C, H, D)
    return y if n_c * C == like.shape[1] else torch.cat([y, like[:, n_c * C:]], dim=1)


def default_codec_backend() -> str:
    """Who codes the chunks: 'torch' (train/kv_codec.py, the PyTorch oracle) unless MOQAE_REF_CODEC=c asks
    for the runtime's own encoder through build/kv-codec-dump (byte-identical, tests/test_kv_codec.py;
    2-4x faster, and two processes code K and V at once)."""
    return os.environ.get("MOQAE_REF_CODEC", "torch")


def codec_tool() -> str:
    return os.path.join(os.path.dirname(default_tokenizer()), "kv-codec-dump")


def _roundtrip_c(k32: torch.Tensor, v32: torch.Tensor, codec: str, G: int):
    """decode(encode(x)) of key and value records [R][C][D] by the runtime's encoder (build/kv-codec-dump)."""
    R, C, D = k32.shape
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        procs, outs = [], []
        for kind, x in (("k", k32), ("v", v32)):
            src, dec = os.path.join(d, kind + ".f32"), os.path.join(d, kind + ".dec")
            x.contiguous().numpy().astype("<f4").tofile(src)
            procs.append(subprocess.Popen([codec_tool(), kind, codec, str(C), str(D), str(G), src,
                                           os.path.join(d, kind + ".bin"), dec], stderr=subprocess.PIPE))
            outs.append(dec)
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"kv-codec-dump failed: {p.stderr.read().decode(errors='replace')}")
        return tuple(torch.from_numpy(np.fromfile(o, dtype="<f4").reshape(R, C, D)) for o in outs)


@torch.no_grad()
def codec_noise(rk: torch.Tensor, rv: torch.Tensor, codec: str, rope: "RingRope | None" = None, chunk_idx=None,
                backend: str | None = None):
    """THE "what is stored" step of a completed chunk, as a difference: (key used − stored key, value used −
    stored value) for records rk, rv [N][H][C][D] (stored_kv's values) of one codec. Keys are encoded as is
    (after RoPE), or, with rope (keys before RoPE; chunk_idx [N] the records' chunk indices), turned back
    to before RoPE first and the decoded keys turned forward again: key used = R(P0+t) dec(enc(R(-P0-t) k)).
    FP16 records hold the stored values themselves (after RoPE): zero noise. Coded in f32 on the CPU by
    kv_codec.py or the runtime's encoder (backend, default_codec_backend)."""
    if codec == "fp16":
        return torch.zeros_like(rk), torch.zeros_like(rv)
    N, H, C, D = rk.shape
    k = rk.detach() if rope is None else rope.to_pre(rk.detach(), chunk_idx)
    k32, v32 = k.float().cpu().reshape(-1, C, D), rv.detach().float().cpu().reshape(-1, C, D)
    if (backend or default_codec_backend()) == "c":
        kd, vd = _roundtrip_c(k32, v32, codec, v_group(D))
    else:
        kd, vd = kv_codec.roundtrip_k(k32, codec), kv_codec.roundtrip_v(v32, codec, v_group(D))
    kd = kd.reshape(N, H, C, D).to(device=rk.device, dtype=rk.dtype)
    if rope is not None:
        kd = rope.to_post(kd, chunk_idx)
    return kd - rk.detach(), (vd - v32).reshape(rv.shape).to(device=rv.device, dtype=rv.dtype)


@dataclasses.dataclass
class KVRule:
    """Base of the KV rules: chunk size C, and where quantized records hold keys: 'pre' (before RoPE,
    the runtime's default) or 'post'."""
    chunk: int = 32
    key_store: str = dataclasses.field(default_factory=default_key_store)
    codec: str = dataclasses.field(default_factory=default_codec_backend)  # 'torch' or 'c' (codec_noise)

    def decoded(self, model, il: int, ks: torch.Tensor, vs: torch.Tensor):
        """(kd, vd) [B][T][Hkv][D]: the keys (after RoPE) and values a query uses for each token once its
        chunk is complete (rows of the incomplete last chunk: anything), or None when they are ks, vs."""
        raise NotImplementedError

    def key_sets(self, model, il, k_pre, k_post, v, cs):
        """(k_own, v_own, (k_dec, v_dec) or None), [B][T][Hkv][D]: the keys (after RoPE) and values a query
        sees for a token of its own chunk, and for a token of an earlier complete chunk."""
        ks, vs = stored_kv(k_post, v)
        return ks, vs, self.decoded(model, il, ks, vs)

    def _setup(self, model, ks):
        """(n_c, rope, idx): the chunks some query sees decoded — query p sees chunks < p / C, so the first
        (T - 1) / C (a last complete chunk is encoded by the runtime, never read in this window) —, the
        ring's rotation tables (keys before RoPE) and the chunk index of each record [B][n_c]."""
        if self.key_store not in KEY_STORES:
            raise ValueError(f"key_store must be one of {KEY_STORES}, not {self.key_store!r}")
        C = self.chunk
        n_c = (ks.shape[1] - 1) // C
        rope = RingRope(model.hp, C, n_c, ks.device, ks.dtype) if self.key_store == "pre" and n_c else None
        idx = torch.arange(n_c, device=ks.device).expand(ks.shape[0], n_c)  # [B][n_c] chunk index
        return n_c, rope, idx


@dataclasses.dataclass
class HardKV(KVRule):
    """Deployment: codec index (CODECS) per (window, chunk, layer), assign [B][n_chunks][n_layer]
    (extra chunks ignored). Gradients pass straight through the codecs."""
    assign: torch.Tensor = None

    def decoded(self, model, il, ks, vs):
        n_c, rope, idx = self._setup(model, ks)
        a = self.assign[:, :n_c, il].to(ks.device)
        if n_c == 0 or bool((a == CODEC_INDEX["fp16"]).all()):
            return None
        rk, rv = _records(ks, n_c, self.chunk), _records(vs, n_c, self.chunk)
        dk, dv = torch.zeros_like(rk), torch.zeros_like(rv)
        for ci in a.unique().tolist():
            if CODECS[ci] == "fp16":
                continue
            sel = a == ci  # [B][n_c]
            dk[sel], dv[sel] = codec_noise(rk[sel], rv[sel], CODECS[ci], rope, idx[sel], self.codec)
        return _unrecords(rk + dk, ks), _unrecords(rv + dv, vs)


@dataclasses.dataclass
class SoftKV(KVRule):
    """Training: a completed chunk's K/V at the layers of router group g is sum_j w_j used_j(K), written
    K + sum_j w_j (used_j(K) - K).detach() (straight-through), so the gradient reaches the weights w.
    weights: [B][n_group][n_chunks][E] (rows sum to 1; train_router.py passes the penalty-weighted
    probabilities), experts: the E codec names, group_size: layers per group. frozen: chunk 0 is FP16."""
    weights: torch.Tensor = None
    experts: tuple = ()
    group_size: int = 1
    frozen: bool = True
    # Optional noise cache (train_router.py --pool): {(window id, layer, codec): (nk, nv) f16}. A window's
    # quantisation noise is computed the first time it is seen and reused on later visits (an
    # approximation: the noise of K as the earlier layers' mixture made it at that first visit).
    cache: dict = None
    window_ids: list = None

    def decoded(self, model, il, ks, vs):
        n_c, rope, idx = self._setup(model, ks)
        if n_c == 0:
            return None
        w = self.weights[:, il // self.group_size, :n_c].to(ks.dtype)  # [B][n_c][E]
        c0 = 1 if self.frozen else 0  # chunk 0 frozen: FP16, no noise to compute
        rk, rv = _records(ks, n_c, self.chunk), _records(vs, n_c, self.chunk)
        flat = idx[:, c0:].reshape(-1)
        mk, mv = rk, rv
        for j, codec in enumerate(self.experts):
            if codec == "fp16" or c0 >= n_c:
                continue
            nk, nv = self._noise(il, codec, rk[:, c0:], rv[:, c0:], rope, flat)
            wj = w[:, c0:, j, None, None, None]
            pad = (0, 0, 0, 0, 0, 0, c0, 0)  # zero noise for the frozen chunk (dim 1)
            mk = mk + F.pad(wj * nk.reshape(rk[:, c0:].shape), pad)
            mv = mv + F.pad(wj * nv.reshape(rv[:, c0:].shape), pad)
        return _unrecords(mk, ks), _unrecords(mv, vs)


    def _noise(self, il, codec, rk, rv, rope, flat):
        """codec_noise of records rk, rv [B][n][H][C][D] (flattened result), through the cache if any."""
        if self.cache is None:
            return codec_noise(rk.flatten(0, 1), rv.flatten(0, 1), codec, rope, flat, self.codec)
        keys = [(w, il, codec) for w in self.window_ids]
        if not all(k in self.cache for k in keys):
            nk, nv = codec_noise(rk.flatten(0, 1), rv.flatten(0, 1), codec, rope, flat, self.codec)
            nk, nv = nk.reshape(rk.shape), nv.reshape(rv.shape)
            for b, k in enumerate(keys):
                self.cache[k] = (nk[b].detach().to("cpu", torch.float16), nv[b].detach().to("cpu", torch.float16))
        nk = torch.stack([self.cache[k][0] for k in keys]).to(rk.device, rk.dtype)
        nv = torch.stack([self.cache[k][1] for k in keys]).to(rv.device, rv.dtype)
        return nk.flatten(0, 1), nv.flatten(0, 1)


@dataclasses.dataclass
class FnKV(KVRule):
    """Codec research (kv_dump.py, codec_study.py): fn(il, k_pre, k_post, v) -> (k_used, v_used), all
    [T][Hkv][D] of one sequence, gives what a query sees for tokens of earlier complete chunks (keys after
    RoPE); its own chunk is exact f32, not f16-rounded: the comparisons are against the exact model."""
    fn: object = None

    def key_sets(self, model, il, k_pre, k_post, v, cs):
        if k_pre.shape[0] != 1:
            raise ValueError("FnKV: one sequence at a time")
        kd, vd = self.fn(il, k_pre[0], k_post[0], v[0])
        return k_post, v, (kd[None], vd[None])


def policy_assign(policy: str, B: int, n_chunks: int, n_layer: int) -> torch.Tensor:
    """A fixed --kv policy as an assignment [B][n_chunks][n_layer] of codec indices."""
    if policy not in POLICIES:
        raise ValueError(f"unknown KV policy {policy!r} (valid: {', '.join(POLICIES)})")
    codec, sink = POLICIES[policy]
    a = torch.full((B, n_chunks, n_layer), CODEC_INDEX[codec], dtype=torch.long)
    if sink and n_chunks:
        a[:, 0] = CODEC_INDEX["fp16"]
    return a


# ================================================================================================
# tokenizer (the runtime's own, through build/tokenize-dump) and scoring
# ================================================================================================

def default_tokenizer() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.environ.get("MOQAE_BIN_DIR", os.path.join(root, "build")), "tokenize-dump")


def tokenize(model: str, text: bytes, tool: str | None = None, add_special: bool = True) -> list:
    """Token ids of text by the runtime's tokenizer (add_special as moqae-perplexity: BOS if the model adds it)."""
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(text)
    try:
        args = [tool or default_tokenizer(), model, f.name] + ([] if add_special else ["--no-special"])
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return [int(t) for t in out.split()]


def tokenizer_info(model: str, tool: str | None = None) -> dict:
    """n_vocab, bos, eos, add_bos, add_eos as the runtime's tokenizer reads them (tokenize-dump --info)."""
    out = subprocess.run([tool or default_tokenizer(), model, "--info"], capture_output=True, text=True,
                         check=True).stdout.split("\n")[0].split()
    return {k: int(v) for k, v in zip(out[0::2], out[1::2])}


def ppl_tokens(model: str, text: bytes, n_ctx: int, n_windows: int, tool: str | None = None) -> tuple:
    """(tokens, bos) of a text scored as moqae_perplexity scores it: the ids of what n_windows windows of
    n_ctx need (all of the text when n_windows is 0 or its start falls short), and the BOS id that replaces
    each window's first token (None when the model adds no BOS)."""
    info = tokenizer_info(model, tool)
    bos = info["bos"] if info["add_bos"] and info["bos"] >= 0 else None
    need = n_ctx * (n_windows + 1) if n_windows else 0
    tokens = tokenize(model, text[:need * 16] if need else text, tool)
    if need and len(tokens) < need:
        tokens = tokenize(model, text, tool)
    return tokens, bos


def nll(logits, tokens, first: int = 0) -> tuple:
    """Sum of -log p(token[t+1]) for t >= first, and the count (logits: [T][n_vocab] from position 0)."""
    lp = torch.log_softmax(logits[:-1].double(), dim=-1)
    tgt = torch.as_tensor(np.asarray(tokens[1:]))
    v = -lp[torch.arange(len(tokens) - 1), tgt][first:]
    return float(v.sum()), int(v.numel())


def ppl_window(tokens: list, n_ctx: int, ci: int, bos: int | None) -> list:
    """Window ci of moqae_perplexity: tokens[ci*n_ctx : (ci+1)*n_ctx], its first token replaced by BOS
    when the model adds one (bos None otherwise)."""
    win = list(tokens[ci * n_ctx:(ci + 1) * n_ctx])
    if bos is not None:
        win[0] = bos
    return win


@torch.no_grad()
def window_nll(model: LlamaModel, tokens: list, n_ctx: int, ci: int, bos: int | None, kv: KVRule | None):
    """NLLs (float64 numpy) of the scored tokens of window ci, as moqae_perplexity scores them: logits of
    positions n_ctx/2 .. n_ctx-2 predict tokens n_ctx/2+1 .. n_ctx-1 of the original text."""
    first = n_ctx // 2
    win = ppl_window(tokens, n_ctx, ci, bos)
    logits = model.forward(win, kv=kv, logits_rows=slice(first, n_ctx - 1))
    lp = torch.log_softmax(logits.double(), dim=-1)
    tgt = torch.as_tensor(tokens[ci * n_ctx + first + 1:(ci + 1) * n_ctx], device=lp.device)
    return (-lp[torch.arange(len(tgt), device=lp.device), tgt]).cpu().numpy()


def kv_bits(assign: torch.Tensor, n_tok: int, C: int, n_head_kv: int, head_dim: int) -> tuple:
    """(nominal, effective) bits per stored K/V element of one window as the runtime's moqae_kv_stats counts
    them: assign [n_chunks][n_layer] codecs of the complete chunks; the residual window (n_tok - n_chunks*C
    tokens) counts 16 nominal bits and 32 effective (f32 storage)."""
    n_c, n_layer = assign.shape
    resid = n_tok - n_c * C
    per_tok = 2 * n_layer * n_head_kv * head_dim
    G = v_group(head_dim)
    code_bits = sum(kv_codec.CODEC_BITS[CODECS[c]] for c in assign.flatten().tolist()) * C / n_layer
    rec_bytes = sum(n_head_kv * (kv_codec.k_bytes(CODECS[c], C, head_dim) + kv_codec.v_bytes(CODECS[c], C, head_dim, G))
                    for c in assign.flatten().tolist())
    nominal = (code_bits + 16.0 * resid) / n_tok
    effective = (rec_bytes + resid * per_tok * 4.0) * 8.0 / (n_tok * per_tok)
    return nominal, effective
