"""The runtime's KV codecs in PyTorch, byte for byte: encode a completed chunk of one KV head's keys or
values into the record that runtime/src/kv-codec.c writes (uint8 tensor, identical bytes), decode a
record, and `roundtrip_k/v` (decode(encode(x)) without packing) for simulating the quantized cache.
The spec is the layout comment in runtime/src/kv-codec.h (docs/KV-CODECS.md explains it: Hadamard
rotation, an outlier token per key record, an encoder that searches the scale and zero codes); every
f32 operation below mirrors kv-codec.c in the same order (separate multiply and add, true division,
sums in the same order or in exact integers), and tests/test_kv_codec.py checks the bytes against the C
encoder. All functions take a batch of records: x is [R][C][D] float32 (R chunks or heads), records
are [R][bytes] uint8. CPU float32 only (torch on CUDA may fuse or reorder).
"""
from __future__ import annotations

import torch

CODEC_BITS = {"fp16": 16, "int8": 8, "int4": 4, "int2": 2}
V_GROUP = 64  # MOQAE_KV_V_GROUP
K_SCALE_SHARE = 1  # MOQAE_KV_K_SCALE_SHARE; values share one scale code per token: D // G groups
def search_scales(bits: int) -> int:
    """MOQAE_KV_SEARCH_SCALES: scale codes tried from the covering one down (int2 clips deeper)."""
    return 16 if bits == 2 else 8



SEARCH_ZEROS = 2  # MOQAE_KV_SEARCH_ZEROS: zero codes tried around the centred one (+-)
ERR_BITS = 40  # MOQAE_KV_ERR_BITS: squared errors in units of 2^-40 (qmax * scale)^2 (exact int64 sums)
ERR_CAP = float(2 ** 48)

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


# ------------------------------------------------------------------------------------------------
# sizes
# ------------------------------------------------------------------------------------------------

def _geom(bits: int, n_groups: int, n_elems: int, share: int, outlier: bool):
    """(codes bytes, zcode bytes, scode bytes, total) of a record; keys (outlier) add a row of n_groups
    b-bit codes (the outlier's high bits) and 5 bytes (its f16 zero and scale, its index)."""
    codes = n_groups * n_elems * bits // 8
    xrow = n_groups * bits // 8 if outlier else 0
    total = codes + xrow + n_groups + n_groups // share + 6 + (5 if outlier else 0)
    return codes, n_groups, n_groups // share, total


def k_bytes(codec: str, C: int, D: int) -> int:
    return 2 * C * D if codec == "fp16" else _geom(CODEC_BITS[codec], D, C, K_SCALE_SHARE, True)[3]


def v_bytes(codec: str, C: int, D: int, G: int = V_GROUP) -> int:
    return 2 * C * D if codec == "fp16" else _geom(CODEC_BITS[codec], C * D // G, G, D // G, False)[3]


def effective_bits(codec: str, C: int, D: int, G: int = V_GROUP) -> float:
    return (k_bytes(codec, C, D) + v_bytes(codec, C, D, G)) * 8 / (2 * C * D)


# ------------------------------------------------------------------------------------------------
# the Hadamard rotation: blocks of n = the largest power of two dividing the row (or group) length
# ------------------------------------------------------------------------------------------------

def rot_block(n: int) -> int:
    """moqae_kv_rot_block: the largest power of two that divides n."""
    return n & -n


def _fwht(x: torch.Tensor, n: int) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of each block of n along the last axis, the butterflies of
    kv-codec.c's fwht in the same order: for h = 1, 2, ..: (a, b) -> (a + b, a - b) for a = x[i], b = x[i+h]."""
    shp = x.shape
    h = 1
    while h < n:
        y = x.reshape(*shp[:-1], shp[-1] // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack([a + b, a - b], dim=-2).reshape(shp)
        h *= 2
    return x


def _rot_scales(n: int):
    """(forward, inverse) factors: powers of two with fwd * inv * n = 1, so both transforms are exact
    scalings of the butterflies and rotated values stay within a factor sqrt(2) of an orthonormal H."""
    m = n.bit_length() - 1
    return 2.0 ** -(m // 2), 2.0 ** -((m + 1) // 2)


def rotate(x: torch.Tensor, n: int) -> torch.Tensor:
    return _fwht(x, n) * _rot_scales(n)[0]


def unrotate(y: torch.Tensor, n: int) -> torch.Tensor:
    return _fwht(y, n) * _rot_scales(n)[1]


# ------------------------------------------------------------------------------------------------
# the quantizer of one record's groups
# ------------------------------------------------------------------------------------------------

def _scale_table(sb: torch.Tensor) -> torch.Tensor:
    """[R] f32 bases -> [R][256] scales: (sb * FRAC[a % 16]) * 2^-(a / 16), decreasing in a."""
    return (sb[:, None] * FRAC[_A & 15][None, :]) * _POW[None, :]


def _codes(x, zero, scale, qmax):
    """Codes of x for (zero, scale) broadcast against it: clamp(floor((x - zero) / scale + 0.5), 0, qmax)."""
    ok = scale > 0
    q = torch.floor((x - zero) / torch.where(ok, scale, 1.0) + 0.5)
    q = torch.where(q > 0, q.clamp_(max=qmax), 0.0)  # NaN -> 0, as kv-codec.c
    return q if bool(ok.all()) else torch.where(ok, q, 0.0)


def _quantize(x: torch.Tensor, bits: int, share: int, search: bool = False, skip: torch.Tensor | None = None):
    """x: [R][N][M] f32 (R records of N groups of M elements) -> codes [R][N][M] (int64),
    zcode [R][N], scode [R][N/share] (int64), bases [R][3] f16 (zlo, zstep, sbase).
    skip: [R] element index left out of every group of its record (the keys' outlier token: its codes are
    0 here). search: the encoder's search over scale and zero codes (kv-codec.h), else min/max codes."""
    R, N, M = x.shape
    qmax = float(2 ** bits - 1)
    if skip is None:
        keep = torch.ones(R, 1, M, dtype=torch.bool)
    else:
        keep = (torch.arange(M)[None, :] != skip[:, None])[:, None, :]
    lo = torch.where(keep, x, torch.inf).amin(-1)
    hi = torch.where(keep, x, -torch.inf).amax(-1)
    zlo = _f16_step(lo.amin(-1), up=False)
    zl = zlo.float()
    zstep = _f16((lo.amax(-1) - zl) / 255.0)
    zs = zstep.float()
    pos = zs > 0
    zsd = torch.where(pos, zs, 1.0)[:, None]
    t = torch.floor((lo - zl[:, None]) / zsd)
    zc = torch.where(pos[:, None], torch.where(t > 0, torch.clamp(t, max=255.0), 0.0), 0.0)
    zero = zl[:, None] + zs[:, None] * zc
    need = ((hi - zero) / qmax).reshape(R, N // share, share).amax(-1)
    m = need.amax(-1)
    sbase = _f16_step(torch.where(m > 0, m, 0.0), up=True)  # C starts its maximum at +0
    tab = _scale_table(sbase.float())
    cnt = (tab[:, None, :] >= need[:, :, None]).sum(-1)  # covering codes form a prefix 0..cnt-1
    sc = torch.clamp(cnt - 1, min=0)
    if search:
        sc, zc = _search(x, keep, lo, hi, zl, zs, pos, zc, sc, tab, qmax, share)
    scale = torch.gather(tab, 1, sc).repeat_interleave(share, dim=1)
    zero = zl[:, None] + zs[:, None] * zc
    q = torch.where(keep, _codes(x, zero[..., None], scale[..., None], qmax), 0.0)
    bases = torch.stack([zlo, zstep, sbase], dim=1)
    return q.to(torch.int64), zc.to(torch.int64), sc, bases


def _search(x, keep, lo, hi, zl, zs, pos, zc0, a0, tab, qmax, share):
    """For each run of `share` groups (one scale code): try the search_scales(b) scale codes a0, a0 + 1, ..
    (each 2^(-1/16) smaller: clipping at the top), and for each group the zero codes zc0 (no clipping at
    the bottom) and centre + d, |d| <= SEARCH_ZEROS (clipping both ends evenly); keep, per group, the zero
    of least squared error, and per run the scale whose best zeros sum the least (first on ties).
    Errors are exact int64 sums of floor(e^2 * 2^k), k = ERR_BITS - 2 * exponent(qmax * scale(a0)),
    each term capped at 2^48, so the order of summation cannot change the choice."""
    R, N, M = x.shape
    NR = N // share
    s0 = torch.gather(tab, 1, a0) * qmax  # [R][NR] f32
    k = (ERR_BITS - 2 * torch.frexp(s0)[1].to(torch.int64)).repeat_interleave(share, dim=1)  # [R][N]
    p2k = torch.pow(2.0, k.double())[..., None, None]  # exact
    mid = (lo + hi) * 0.5
    zsd = torch.where(pos, zs, 1.0)[:, None, None]
    best_err = best_a = best_zc = None
    for da in range(search_scales(int(qmax).bit_length())):
        a = torch.clamp(a0 + da, max=255)
        s = torch.gather(tab, 1, a).repeat_interleave(share, dim=1)  # [R][N]
        t = (((mid - (s * qmax) * 0.5) - zl[:, None]) / zsd[..., 0])
        cen = torch.floor(t + 0.5)
        cands = torch.stack([zc0] + [cen + d for d in range(-SEARCH_ZEROS, SEARCH_ZEROS + 1)], dim=-1)
        cands = torch.where(pos[:, None, None], torch.clamp(cands, 0.0, 255.0), 0.0)  # [R][N][Z]
        zero = zl[:, None, None] + zs[:, None, None] * cands
        q = _codes(x[:, :, None, :], zero[..., None], s[:, :, None, None], qmax)
        dec = s[:, :, None, None] * q + zero[..., None]
        e = (x[:, :, None, :] - dec).double()
        e = e.mul_(e).mul_(p2k).clamp_(max=ERR_CAP).floor_().to(torch.int64)
        if not bool(keep.all()):
            e = e.mul_(keep[:, :, None, :])
        err = e.sum(-1)  # [R][N][Z]
        gerr, gi = err.min(-1)  # first minimum
        gzc = torch.gather(cands, 2, gi[..., None])[..., 0]
        rerr = gerr.reshape(R, NR, share).sum(-1)
        if best_err is None:
            best_err, best_a, best_zc = rerr, a, gzc
        else:
            better = rerr < best_err
            best_err = torch.where(better, rerr, best_err)
            best_a = torch.where(better, a, best_a)
            best_zc = torch.where(better.repeat_interleave(share, dim=1), gzc, best_zc)
    return best_a, best_zc


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
# the keys' outlier token
# ------------------------------------------------------------------------------------------------

def outlier_index(k: torch.Tensor) -> torch.Tensor:
    """k: [R][C][D] -> [R]: the token farthest (squared L2) from the chunk's mean key, first on ties;
    sums in kv-codec.c's order (tokens, then channels), in f32."""
    R, C, D = k.shape
    s = torch.zeros(R, D)
    for j in range(C):
        s = s + k[:, j, :]
    mean = s / float(C)
    dist = torch.zeros(R, C)
    for d in range(D):
        t = k[:, :, d] - mean[:, d:d + 1]
        dist = dist + t * t
    return dist.argmax(1)


def _outlier_codes(y: torch.Tensor, bits: int):
    """y: [R][D] rotated outlier rows -> codes [R][D] of 2*bits bits (int64), f16 zero and scale [R]."""
    qmax = float(2 ** (2 * bits) - 1)
    xz = _f16_step(y.amin(-1), up=False)
    xs = _f16_step((y.amax(-1) - xz.float()) / qmax, up=True)
    q = _codes(y, xz.float()[:, None], xs.float()[:, None], qmax)
    return q.to(torch.int64), xz, xs


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


def _f16_bytes(h: torch.Tensor) -> torch.Tensor:
    return h.contiguous().view(torch.uint8).reshape(h.shape[0], -1)


# ------------------------------------------------------------------------------------------------
# keys: rotated channels over the chunk's tokens, an outlier token
# ------------------------------------------------------------------------------------------------

def _encode_k_parts(k: torch.Tensor, bits: int):
    R, C, D = k.shape
    xi = outlier_index(k)
    y = rotate(k, rot_block(D))  # [R][C][D]
    ar = torch.arange(R)
    xq, xz, xs = _outlier_codes(y[ar, xi], bits)  # [R][D]
    q, zc, sc, bases = _quantize(y.transpose(1, 2).contiguous(), bits, K_SCALE_SHARE, search=True, skip=xi)
    low = (1 << bits) - 1
    q = q.clone()
    q[ar, :, xi] = xq & low  # the outlier's low bits in its own column
    return q, xq >> bits, zc, sc, bases, xz, xs, xi


def _decode_k_parts(q, xhi, zc, sc, bases, xz, xs, xi, bits):
    """-> [R][C][D] keys (rotated back)."""
    R, D, C = q.shape
    y = _dequantize(q, zc, sc, bases, K_SCALE_SHARE)  # [R][D][C]
    ar = torch.arange(R)
    xq = (xhi << bits) | q[ar, :, xi]
    y[ar, :, xi] = xs.float()[:, None] * xq.float() + xz.float()[:, None]
    return unrotate(y.transpose(1, 2), rot_block(D)).contiguous()


def _parse_k(rec: torch.Tensor, bits: int, C: int, D: int):
    codes, nz, ns, total = _geom(bits, D, C, K_SCALE_SHARE, True)
    if rec.shape[1] != total:
        raise ValueError(f"record has {rec.shape[1]} bytes, expected {total}")
    o = codes
    q = _unpack(rec[:, :o], bits, D, C)
    xhi = _unpack(rec[:, o:o + D * bits // 8], bits, 1, D)[:, 0]
    o += D * bits // 8
    zc = rec[:, o:o + nz].to(torch.int64)
    sc = rec[:, o + nz:o + nz + ns].to(torch.int64)
    o += nz + ns
    f = rec[:, o:o + 10].contiguous().view(torch.float16).reshape(-1, 5)
    xi = rec[:, o + 10].to(torch.int64)
    return q, xhi, zc, sc, f[:, :3], f[:, 3], f[:, 4], xi


def encode_k(k: torch.Tensor, codec: str) -> torch.Tensor:
    """k: [R][C][D] float32 -> [R][k_bytes] uint8, the bytes of moqae_kv_encode_k."""
    R, C, D = k.shape
    _check(codec, C, D, None)
    k = k.to(torch.float32)
    if codec == "fp16":
        return _f16(k.transpose(1, 2).contiguous()).view(torch.uint8).reshape(R, -1)
    bits = CODEC_BITS[codec]
    q, xhi, zc, sc, bases, xz, xs, xi = _encode_k_parts(k, bits)
    return torch.cat([_pack(q, bits), _pack(xhi[:, None, :], bits), zc.to(torch.uint8), sc.to(torch.uint8),
                      _f16_bytes(bases), _f16_bytes(xz[:, None]), _f16_bytes(xs[:, None]),
                      xi.to(torch.uint8)[:, None]], dim=1)


def decode_k(rec: torch.Tensor, codec: str, C: int, D: int) -> torch.Tensor:
    """[R][k_bytes] uint8 -> [R][C][D] float32, as moqae_kv_decode_k."""
    R = rec.shape[0]
    if codec == "fp16":
        return rec.contiguous().view(torch.float16).reshape(R, D, C).float().transpose(1, 2).contiguous()
    bits = CODEC_BITS[codec]
    return _decode_k_parts(*_parse_k(rec, bits, C, D), bits)


def meta_k(rec: torch.Tensor, codec: str, C: int, D: int):
    """Decoded scale and zero of each rotated channel of key records: two [R][D] float32 (moqae_kv_meta_k)."""
    _, _, zc, sc, bases, _, _, _ = _parse_k(rec, CODEC_BITS[codec], C, D)
    return _meta(zc, sc, bases, K_SCALE_SHARE)


def outlier_k(rec: torch.Tensor, codec: str, C: int, D: int):
    """The outlier token of key records: index [R], f16 zero and scale [R] as f32."""
    _, _, _, _, _, xz, xs, xi = _parse_k(rec, CODEC_BITS[codec], C, D)
    return xi, xz.float(), xs.float()


def roundtrip_k(k: torch.Tensor, codec: str) -> torch.Tensor:
    """decode_k(encode_k(k)) without packing: what the runtime's attention sees for these keys."""
    if codec == "fp16":
        return _f16(k.to(torch.float32)).float()
    R, C, D = k.shape
    _check(codec, C, D, None)
    bits = CODEC_BITS[codec]
    return _decode_k_parts(*_encode_k_parts(k.to(torch.float32), bits), bits)


# ------------------------------------------------------------------------------------------------
# values: tokens in groups of G along head_dim, rotated
# ------------------------------------------------------------------------------------------------

def _v_parts(v: torch.Tensor, bits: int, G: int):
    R, C, D = v.shape
    y = rotate(v, rot_block(G)).reshape(R, C * D // G, G)
    return _quantize(y, bits, D // G, search=True)


def _v_decode(q, zc, sc, bases, G, C, D):
    R = q.shape[0]
    return unrotate(_dequantize(q, zc, sc, bases, D // G).reshape(R, C, D), rot_block(G))


def _parse_v(rec: torch.Tensor, bits: int, C: int, D: int, G: int):
    N, M, share = C * D // G, G, D // G
    codes, nz, ns, total = _geom(bits, N, M, share, False)
    if rec.shape[1] != total:
        raise ValueError(f"record has {rec.shape[1]} bytes, expected {total}")
    q = _unpack(rec[:, :codes], bits, N, M)
    zc = rec[:, codes:codes + nz].to(torch.int64)
    sc = rec[:, codes + nz:codes + nz + ns].to(torch.int64)
    bases = rec[:, codes + nz + ns:].contiguous().view(torch.float16).reshape(-1, 3)
    return q, zc, sc, bases


def encode_v(v: torch.Tensor, codec: str, G: int = V_GROUP) -> torch.Tensor:
    """v: [R][C][D] float32 -> [R][v_bytes] uint8, the bytes of moqae_kv_encode_v."""
    R, C, D = v.shape
    _check(codec, C, D, G)
    v = v.to(torch.float32)
    if codec == "fp16":
        return _f16(v).contiguous().view(torch.uint8).reshape(R, -1)
    bits = CODEC_BITS[codec]
    q, zc, sc, bases = _v_parts(v, bits, G)
    return torch.cat([_pack(q, bits), zc.to(torch.uint8), sc.to(torch.uint8), _f16_bytes(bases)], dim=1)


def decode_v(rec: torch.Tensor, codec: str, C: int, D: int, G: int = V_GROUP) -> torch.Tensor:
    """[R][v_bytes] uint8 -> [R][C][D] float32, as moqae_kv_decode_v."""
    R = rec.shape[0]
    if codec == "fp16":
        return rec.contiguous().view(torch.float16).reshape(R, C, D).float()
    return _v_decode(*_parse_v(rec, CODEC_BITS[codec], C, D, G), G, C, D)


def meta_v(rec: torch.Tensor, codec: str, C: int, D: int, G: int = V_GROUP):
    """Decoded scale and zero of value records per (token, group), in the rotated space: two [R][C][D/G]
    (moqae_kv_meta_v)."""
    _, zc, sc, bases = _parse_v(rec, CODEC_BITS[codec], C, D, G)
    s, z = _meta(zc, sc, bases, D // G)
    return s.reshape(-1, C, D // G), z.reshape(-1, C, D // G)


def roundtrip_v(v: torch.Tensor, codec: str, G: int = V_GROUP) -> torch.Tensor:
    """decode_v(encode_v(v)) without packing."""
    if codec == "fp16":
        return _f16(v.to(torch.float32)).float()
    R, C, D = v.shape
    _check(codec, C, D, G)
    return _v_decode(*_v_parts(v.to(torch.float32), CODEC_BITS[codec], G), G, C, D)
