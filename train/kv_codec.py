"""The runtime's KV codecs in PyTorch, byte for byte: encode a completed chunk of one KV head's keys or
values into the record that runtime/src/kv-codec.c writes (uint8 tensor, identical bytes), decode a
record, and `roundtrip_k/v` (decode(encode(x)) without packing) for simulating the quantized cache.
The spec is the layout comment in runtime/src/kv-codec.h; every f32 operation below mirrors kv-codec.c
in the same order (separate multiply and add, true division), and tests/test_kv_codec.py checks the
bytes against the C encoder. All functions take a batch of records: x is [R][C][D] float32 (R chunks
or heads), records are [R][bytes] uint8. CPU float32 only (torch on CUDA may fuse or reorder).
"""
from __future__ import annotations

import torch

CODEC_BITS = {"fp16": 16, "int8": 8, "int4": 4, "int2": 2}
V_GROUP = 32  # MOQAE_KV_V_GROUP
K_SCALE_SHARE = 1  # MOQAE_KV_K_SCALE_SHARE; values share one scale code per token: D // G groups

# FRAC[f] = f32(2^(-f/16)), the same bits as kv-codec.c's table.
FRAC = torch.tensor([float.fromhex(h) for h in (
    "0x1.000000p+0", "0x1.ea4afap-1", "0x1.d5818ep-1", "0x1.c199bep-1", "0x1.ae89fap-1", "0x1.9c4918p-1",
    "0x1.8ace54p-1", "0x1.7a1148p-1", "0x1.6a09e6p-1", "0x1.5ab07ep-1", "0x1.4bfdaep-1", "0x1.3dea64p-1",
    "0x1.306fe0p-1", "0x1.2387a6p-1", "0x1.172b84p-1", "0x1.0b5586p-1")], dtype=torch.float32)
_A = torch.arange(256)
# 2^-(a/16 integer part), exact powers of two
_POW = torch.pow(torch.tensor(2.0, dtype=torch.float32), -(_A >> 4).to(torch.float32))


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def _f16_step(x: torch.Tensor, up: bool) -> torch.Tensor:
    """f16 of x rounded toward +inf (up) or -inf: nearest even, then one step if it went the wrong way."""
    h = x.to(torch.float16)
    u = h.view(torch.int16).to(torch.int32) & 0xFFFF
    neg = (u & 0x8000) != 0
    if up:
        wrong = h.float() < x
        nxt = torch.where(u == 0x8000, 1, torch.where(neg, u - 1, u + 1))
    else:
        wrong = h.float() > x
        nxt = torch.where(u == 0x0000, 0x8001, torch.where(neg, u + 1, u - 1))
    u = torch.where(wrong, nxt, u)
    return torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16).view(torch.float16)


def _check(codec: str, C: int, D: int, G: int | None):
    """As moqae_kv_shape_check (G None: keys only, no value group to check)."""
    if codec not in CODEC_BITS:
        raise ValueError(f"unknown codec {codec!r}")
    if C % 16 or not 16 <= C <= 256 or D % 2 or not 2 <= D <= 256:
        raise ValueError(f"bad chunk shape C={C} D={D}")
    if codec == "fp16":
        return
    if D % 16 or D % K_SCALE_SHARE:
        raise ValueError(f"codec {codec} needs head_dim a multiple of 16, not {D}")
    if G is not None and (G % 16 or D % G):
        raise ValueError(f"value group {G}: must be a multiple of 16 that divides head_dim {D}")


def _geom(bits: int, n_groups: int, n_elems: int, share: int):
    codes = n_groups * n_elems * bits // 8
    return codes, n_groups, n_groups // share, codes + n_groups + n_groups // share + 6


def k_bytes(codec: str, C: int, D: int) -> int:
    return 2 * C * D if codec == "fp16" else _geom(CODEC_BITS[codec], D, C, K_SCALE_SHARE)[3]


def v_bytes(codec: str, C: int, D: int, G: int = V_GROUP) -> int:
    return 2 * C * D if codec == "fp16" else _geom(CODEC_BITS[codec], C * D // G, G, D // G)[3]


def effective_bits(codec: str, C: int, D: int, G: int = V_GROUP) -> float:
    return (k_bytes(codec, C, D) + v_bytes(codec, C, D, G)) * 8 / (2 * C * D)


# ------------------------------------------------------------------------------------------------
# the quantizer of one record's groups
# ------------------------------------------------------------------------------------------------

def _scale_table(sb: torch.Tensor) -> torch.Tensor:
    """[R] f32 bases -> [R][256] scales: (sb * FRAC[a % 16]) * 2^-(a / 16), decreasing in a."""
    return (sb[:, None] * FRAC[_A & 15][None, :]) * _POW[None, :]


def _quantize(x: torch.Tensor, bits: int, share: int):
    """x: [R][N][M] f32 (R records of N groups of M elements) -> codes [R][N][M] (int64),
    zcode [R][N], scode [R][N/share] (int64), bases [R][3] f16 (zlo, zstep, sbase)."""
    R, N, M = x.shape
    qmax = float(2 ** bits - 1)
    lo = x.amin(-1)
    hi = x.amax(-1)
    zlo = _f16_step(lo.amin(-1), up=False)
    zl = zlo.float()
    zstep = _f16((lo.amax(-1) - zl) / 255.0)
    zs = zstep.float()
    pos = zs > 0
    t = torch.floor((lo - zl[:, None]) / torch.where(pos, zs, 1.0)[:, None])
    zc = torch.where(pos[:, None], torch.where(t > 0, torch.clamp(t, max=255.0), 0.0), 0.0)
    zero = zl[:, None] + zs[:, None] * zc
    need = ((hi - zero) / qmax).reshape(R, N // share, share).amax(-1)
    m = need.amax(-1)
    sbase = _f16_step(torch.where(m > 0, m, 0.0), up=True)  # C starts its maximum at +0
    tab = _scale_table(sbase.float())
    cnt = (tab[:, None, :] >= need[:, :, None]).sum(-1)  # covering codes form a prefix 0..cnt-1
    sc = torch.clamp(cnt - 1, min=0)
    scale = torch.gather(tab, 1, sc).repeat_interleave(share, dim=1)
    ok = scale > 0
    q = torch.floor((x - zero[..., None]) / torch.where(ok, scale, 1.0)[..., None] + 0.5)
    q = torch.where(ok[..., None], torch.where(q > 0, torch.clamp(q, max=qmax), 0.0), 0.0)
    bases = torch.stack([zlo, zstep, sbase], dim=1)
    return q.to(torch.int64), zc.to(torch.int64), sc, bases


def _meta(zc, sc, bases, share):
    """Per-group (scale, zero), [R][N] each."""
    b = bases.float()
    zero = b[:, 0:1] + b[:, 1:2] * zc.float()
    scale = torch.gather(_scale_table(b[:, 2]), 1, sc).repeat_interleave(share, dim=1)
    return scale, zero


def _dequantize(q, zc, sc, bases, share):
    """The decoder of kv-codec.h: scale * code + zero with the product rounded first."""
    scale, zero = _meta(zc, sc, bases, share)
    return scale[..., None] * q.float() + zero[..., None]


# ------------------------------------------------------------------------------------------------
# packing: rows of 16-code blocks
# ------------------------------------------------------------------------------------------------

def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q: [R][N][M] codes -> [R][N*M*bits/8] uint8 (groups are contiguous, M a multiple of 16)."""
    R = q.shape[0]
    blk = q.reshape(R, -1, 16)
    if bits == 8:
        out = blk
    elif bits == 4:
        out = blk[..., :8] | (blk[..., 8:] << 4)
    else:
        b4 = blk.reshape(R, -1, 4, 4)  # [block][k][i] = element 4k + i
        out = b4[:, :, 0] | (b4[:, :, 1] << 2) | (b4[:, :, 2] << 4) | (b4[:, :, 3] << 6)
    return out.reshape(R, -1).to(torch.uint8)


def _unpack(b: torch.Tensor, bits: int, N: int, M: int) -> torch.Tensor:
    R = b.shape[0]
    x = b.to(torch.int64)
    if bits == 8:
        q = x
    elif bits == 4:
        blk = x.reshape(R, -1, 8)
        q = torch.cat([blk & 15, blk >> 4], dim=-1)
    else:
        blk = x.reshape(R, -1, 4)
        q = torch.stack([(blk >> (2 * k)) & 3 for k in range(4)], dim=2)
    return q.reshape(R, N, M)


def _record(q, zc, sc, bases, bits) -> torch.Tensor:
    return torch.cat([_pack(q, bits), zc.to(torch.uint8), sc.to(torch.uint8),
                      bases.contiguous().view(torch.uint8).reshape(q.shape[0], 6)], dim=1)


def _parse(rec: torch.Tensor, bits: int, N: int, M: int, share: int):
    codes, nz, ns, total = _geom(bits, N, M, share)
    if rec.shape[1] != total:
        raise ValueError(f"record has {rec.shape[1]} bytes, expected {total}")
    q = _unpack(rec[:, :codes], bits, N, M)
    zc = rec[:, codes:codes + nz].to(torch.int64)
    sc = rec[:, codes + nz:codes + nz + ns].to(torch.int64)
    bases = rec[:, codes + nz + ns:].contiguous().view(torch.float16).reshape(-1, 3)
    return q, zc, sc, bases


# ------------------------------------------------------------------------------------------------
# public: keys (groups = channels over the chunk's tokens) and values (groups of G along head_dim)
# ------------------------------------------------------------------------------------------------

def _k_groups(k: torch.Tensor) -> torch.Tensor:
    return k.transpose(1, 2).contiguous()  # [R][D][C]


def _v_groups(v: torch.Tensor, G: int) -> torch.Tensor:
    R, C, D = v.shape
    return v.reshape(R, C * D // G, G)


def encode_k(k: torch.Tensor, codec: str) -> torch.Tensor:
    """k: [R][C][D] float32 -> [R][k_bytes] uint8, the bytes of moqae_kv_encode_k."""
    R, C, D = k.shape
    _check(codec, C, D, None)
    k = k.to(torch.float32)
    if codec == "fp16":
        return _f16(_k_groups(k)).view(torch.uint8).reshape(R, -1)
    bits = CODEC_BITS[codec]
    return _record(*_quantize(_k_groups(k), bits, K_SCALE_SHARE), bits)


def encode_v(v: torch.Tensor, codec: str, G: int = V_GROUP) -> torch.Tensor:
    """v: [R][C][D] float32 -> [R][v_bytes] uint8, the bytes of moqae_kv_encode_v."""
    R, C, D = v.shape
    _check(codec, C, D, G)
    v = v.to(torch.float32)
    if codec == "fp16":
        return _f16(v).contiguous().view(torch.uint8).reshape(R, -1)
    bits = CODEC_BITS[codec]
    return _record(*_quantize(_v_groups(v, G), bits, D // G), bits)


def decode_k(rec: torch.Tensor, codec: str, C: int, D: int) -> torch.Tensor:
    """[R][k_bytes] uint8 -> [R][C][D] float32, as moqae_kv_decode_k."""
    R = rec.shape[0]
    if codec == "fp16":
        return rec.contiguous().view(torch.float16).reshape(R, D, C).float().transpose(1, 2).contiguous()
    q, zc, sc, bases = _parse(rec, CODEC_BITS[codec], D, C, K_SCALE_SHARE)
    return _dequantize(q, zc, sc, bases, K_SCALE_SHARE).transpose(1, 2).contiguous()


def decode_v(rec: torch.Tensor, codec: str, C: int, D: int, G: int = V_GROUP) -> torch.Tensor:
    """[R][v_bytes] uint8 -> [R][C][D] float32, as moqae_kv_decode_v."""
    R = rec.shape[0]
    if codec == "fp16":
        return rec.contiguous().view(torch.float16).reshape(R, C, D).float()
    q, zc, sc, bases = _parse(rec, CODEC_BITS[codec], C * D // G, G, D // G)
    return _dequantize(q, zc, sc, bases, D // G).reshape(R, C, D)


def meta_k(rec: torch.Tensor, codec: str, C: int, D: int):
    """Decoded per-channel scale and zero of key records: two [R][D] float32 (moqae_kv_meta_k)."""
    _, zc, sc, bases = _parse(rec, CODEC_BITS[codec], D, C, K_SCALE_SHARE)
    return _meta(zc, sc, bases, K_SCALE_SHARE)


def meta_v(rec: torch.Tensor, codec: str, C: int, D: int, G: int = V_GROUP):
    """Decoded scale and zero of value records per (token, group): two [R][C][D/G] (moqae_kv_meta_v)."""
    _, zc, sc, bases = _parse(rec, CODEC_BITS[codec], C * D // G, G, D // G)
    s, z = _meta(zc, sc, bases, D // G)
    return s.reshape(-1, C, D // G), z.reshape(-1, C, D // G)


def roundtrip_k(k: torch.Tensor, codec: str) -> torch.Tensor:
    """decode_k(encode_k(k)) without packing: what the runtime's attention sees for these keys."""
    if codec == "fp16":
        return _f16(k.to(torch.float32)).float()
    R, C, D = k.shape
    _check(codec, C, D, None)
    q, zc, sc, bases = _quantize(_k_groups(k.to(torch.float32)), CODEC_BITS[codec], K_SCALE_SHARE)
    return _dequantize(q, zc, sc, bases, K_SCALE_SHARE).transpose(1, 2).contiguous()


def roundtrip_v(v: torch.Tensor, codec: str, G: int = V_GROUP) -> torch.Tensor:
    """decode_v(encode_v(v)) without packing."""
    if codec == "fp16":
        return _f16(v.to(torch.float32)).float()
    R, C, D = v.shape
    _check(codec, C, D, G)
    q, zc, sc, bases = _quantize(_v_groups(v.to(torch.float32), G), CODEC_BITS[codec], D // G)
    return _dequantize(q, zc, sc, bases, D // G).reshape(R, C, D)
