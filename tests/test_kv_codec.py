"""KV codecs: train/kv_codec.py (PyTorch) and runtime/src/kv-codec.c produce the same bytes for the same
input, decode to the same floats, and keep round-trip errors within bounds on random data and on real
K/V from SmolLM2. The C side runs through tests/tools/kv-codec-dump.c. Layouts: kv-codec.h."""
from __future__ import annotations

import subprocess
import zlib

import numpy as np
import pytest

from conftest import ROOT, bin_path

torch = pytest.importorskip("torch")
import kv_codec  # noqa: E402  (train/, on sys.path through conftest)

torch.set_num_threads(1)  # small tensors: threads only add contention on the 2-core CI machine

CODECS = ["fp16", "int8", "int4", "int2"]
QMAX = {"int8": 255, "int4": 15, "int2": 3}
# Normalised RMSE (rmse / rms(x)) bounds on SmolLM2's real K (after RoPE) and V of its first layers
# (measured values in docs/KV-CODECS.md, plus margin).
REAL_NRMSE = {"int8": {"k": 0.006, "v": 0.012}, "int4": {"k": 0.06, "v": 0.11}, "int2": {"k": 0.30, "v": 0.45}}


def c_dump(tmp_path, kind: str, codec: str, x: np.ndarray, G: int):
    exe = bin_path("kv-codec-dump")
    if not exe.exists():
        pytest.fail(f"{exe} not found: build first (scripts/build.sh) or set MOQAE_BIN_DIR")
    R, C, D = x.shape
    src, out, dec = tmp_path / "x.f32", tmp_path / "rec.bin", tmp_path / "dec.f32"
    x.astype("<f4").tofile(src)
    subprocess.run([str(exe), kind, codec, str(C), str(D), str(G), str(src), str(out), str(dec)], check=True)
    rec = np.fromfile(out, dtype=np.uint8).reshape(R, -1)
    return rec, np.fromfile(dec, dtype="<f4").reshape(R, C, D)


def sample(rng, R: int, C: int, D: int) -> np.ndarray:
    """Awkward inputs: per-channel offsets and outliers, constant groups and channels, tiny ranges
    (subnormal f16 scales), exact ties at half steps, zeros and negative zeros."""
    x = rng.standard_normal((R, C, D)).astype(np.float32)
    x *= rng.choice([1e-3, 0.1, 1.0, 10.0], size=(R, 1, D)).astype(np.float32)
    x += rng.choice([0.0, -5.0, 3.0, 200.0], size=(R, 1, D)).astype(np.float32)
    x[0, :, : D // 4] = 1.5  # constant channels
    x[0, 3, :] = 0.0  # a constant token row (value groups with max == min)
    x[1 % R, :, 1] = -0.0
    x[-1] = np.round(x[-1] * 4) / 4  # values on a coarse grid: ties in the rounding
    x[R // 2] *= np.float32(1e-6)  # ranges whose scales are f16 subnormals
    return x


SHAPES = [(32, 64, 32), (64, 128, 32), (32, 48, 16), (16, 64, 64), (64, 64, 64)]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "C%d-D%d-G%d" % s)
def test_same_bytes_as_c(tmp_path, codec, shape):
    C, D, G = shape
    rng = np.random.default_rng(zlib.crc32(repr((codec, shape)).encode()))  # fixed per case
    x = sample(rng, 6, C, D)
    for kind in ("k", "v"):
        rec_c, dec_c = c_dump(tmp_path, kind, codec, x, G)
        xt = torch.from_numpy(x)
        rec_t = kv_codec.encode_k(xt, codec) if kind == "k" else kv_codec.encode_v(xt, codec, G)
        size = kv_codec.k_bytes(codec, C, D) if kind == "k" else kv_codec.v_bytes(codec, C, D, G)
        assert rec_t.dtype == torch.uint8 and rec_t.shape == (6, size) == rec_c.shape
        diff = np.nonzero(rec_t.numpy() != rec_c)
        assert diff[0].size == 0, f"{kind} {codec} {shape}: bytes differ at (record, byte) {list(zip(*diff))[:8]}"
        dec_t = kv_codec.decode_k(rec_t, codec, C, D) if kind == "k" else kv_codec.decode_v(rec_t, codec, C, D, G)
        rt = kv_codec.roundtrip_k(xt, codec) if kind == "k" else kv_codec.roundtrip_v(xt, codec, G)
        assert np.array_equal(dec_t.numpy().view(np.uint32), dec_c.view(np.uint32)), f"{kind} {codec}: decode"
        assert np.array_equal(rt.numpy().view(np.uint32), dec_c.view(np.uint32)), f"{kind} {codec}: roundtrip"


def test_sizes_match_c():
    exe = bin_path("kv-codec-dump")
    for C, D, G in SHAPES:
        out = subprocess.run([str(exe), "--sizes", str(C), str(D), str(G)], capture_output=True, text=True,
                             check=True).stdout.split("\n")
        for line, codec in zip(out, CODECS):
            name, kb, vb, eff = line.split()
            assert name == codec
            assert int(kb) == kv_codec.k_bytes(codec, C, D) and int(vb) == kv_codec.v_bytes(codec, C, D, G)
            assert abs(float(eff) - kv_codec.effective_bits(codec, C, D, G)) < 1e-6
    # the design target: int4 at C=32, D=64 stays within 4.5 effective bits, scales and zeros included
    assert kv_codec.effective_bits("int4", 32, 64) <= 4.5


def test_frac_table_matches_c():
    src = (ROOT / "runtime/src/kv-codec.c").read_text()
    body = src[src.index("const float moqae_kv_frac[16] = {"):]
    body = body[body.index("{") + 1:body.index("}")]
    c_vals = [float.fromhex(t.strip().rstrip("f")) for t in body.split(",") if t.strip()]
    assert c_vals == kv_codec.FRAC.tolist()
    assert all(np.float32(2.0 ** (-f / 16)) == np.float32(v) for f, v in enumerate(c_vals))


def check_step_bound(x: torch.Tensor, kind: str, codec: str, G: int = kv_codec.V_GROUP):
    """In the rotated space, every element decodes within half its group's step when it lies inside the
    group's decodable range [zero, zero + qmax * scale] (the encoder's search may clip), else to the
    nearest end of it; the keys' outlier token within half the step of its own 2b-bit codes. Returns
    (normalised RMSE of the round trip, max |error| / range of the rotated group)."""
    R, C, D = x.shape
    bits = kv_codec.CODEC_BITS[codec]
    qmax = QMAX[codec]
    if kind == "k":
        rec = kv_codec.encode_k(x, codec)
        y = kv_codec.decode_k(rec, codec, C, D)
        n = kv_codec.rot_block(D)
        s, z = kv_codec.meta_k(rec, codec, C, D)
        s, z = s[:, None, :].expand(R, C, D), z[:, None, :].expand(R, C, D)
    else:
        rec = kv_codec.encode_v(x, codec, G)
        y = kv_codec.decode_v(rec, codec, C, D, G)
        n = kv_codec.rot_block(G)
        s, z = kv_codec.meta_v(rec, codec, C, D, G)
        s, z = s.repeat_interleave(G, dim=2), z.repeat_interleave(G, dim=2)
    xr, yr = kv_codec.rotate(x, n), kv_codec.rotate(y, n)
    want = torch.minimum(torch.maximum(xr, z), z + s * qmax)
    half = s * 0.5
    if kind == "k":  # the outlier row: its own codes over its own range
        xi, _, _ = kv_codec.outlier_k(rec, codec, C, D)
        ar = torch.arange(R)
        rowr = xr[ar, xi]
        want = want.clone()
        half = half.clone()
        want[ar, xi] = rowr
        half[ar, xi] = ((rowr.amax(-1) - rowr.amin(-1)) / (2 ** (2 * bits) - 1) * (1 + 2 ** -9) * 0.5)[:, None]
    rmax = xr.abs().amax(-1, keepdim=True)
    tol = half + 2.0 ** -15 * (rmax + want.abs() + half * qmax)
    err = (yr - want).abs()
    bad = err > tol
    assert not bad.any(), f"{kind} {codec}: {int(bad.sum())} elements beyond half a step, worst {float((err / tol).max())}"
    nrmse = float((y - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt())
    if kind == "k":
        rng_ = (xr.amax(1, keepdim=True) - xr.amin(1, keepdim=True))
    else:
        xg = xr.reshape(R, C, D // G, G)
        rng_ = (xg.amax(-1) - xg.amin(-1)).repeat_interleave(G, dim=2)
    return nrmse, float(((yr - xr).abs() / rng_.clamp_min(1e-30)).max())


@pytest.mark.parametrize("codec", ["int8", "int4", "int2"])
def test_search_never_worse(codec):
    """The encoder's search includes the min/max codes, so no group's squared error (in the search's exact
    fixed point) is larger than theirs, and on Gaussian data the total is clearly smaller."""
    bits = kv_codec.CODEC_BITS[codec]
    rng = np.random.default_rng(11)
    x = torch.from_numpy(rng.standard_normal((16, 32 * 64 // 64, 64)).astype(np.float32))
    plain = kv_codec._quantize(x, bits, 1, search=False)
    found = kv_codec._quantize(x, bits, 1, search=True)
    e_plain = (kv_codec._dequantize(*plain, 1) - x).double().pow(2).sum(-1)
    e_found = (kv_codec._dequantize(*found, 1) - x).double().pow(2).sum(-1)
    assert bool((e_found <= e_plain * (1 + 1e-9) + 1e-30).all())
    if bits < 8:
        assert float(e_found.sum()) < 0.95 * float(e_plain.sum())


def test_outlier_token():
    """The keys' outlier token is the one farthest from the chunk's mean (a planted spike is found), and it
    decodes within half a step of its own 2b-bit codes, so the spike does not widen the other tokens' steps."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 32, 64)).astype(np.float32)
    for r, j in enumerate((0, 7, 16, 31)):
        x[r, j] += 40.0 * (rng.random(64) > 0.5)
    xt = torch.from_numpy(x)
    rec = kv_codec.encode_k(xt, "int4")
    xi, _, _ = kv_codec.outlier_k(rec, "int4", 32, 64)
    assert xi.tolist() == [0, 7, 16, 31]
    y = kv_codec.decode_k(rec, "int4", 32, 64)
    err = (y - xt).abs()
    spike = err[torch.arange(4), xi].max()
    err[torch.arange(4), xi] = 0
    assert float(spike) < 0.05 * 40 and float(err.max()) < 0.6  # N(0,1) tokens: steps of about 0.4


@pytest.mark.parametrize("codec", ["int8", "int4", "int2"])
def test_roundtrip_bound_random(codec):
    rng = np.random.default_rng(7)
    for x in (rng.standard_normal((64, 32, 64)) * 3 + 1, sample(rng, 8, 64, 128)):
        for kind in ("k", "v"):
            check_step_bound(torch.from_numpy(x.astype(np.float32)), kind, codec)
            check_step_bound(torch.from_numpy(x.astype(np.float32)), kind, codec, G=32)


def test_roundtrip_bound_real(smollm2):
    """Real K (before and after RoPE) and V of SmolLM2's first layers on wikitext text."""
    from kv_dump import LlamaTorch, tokenize

    text = (ROOT / "tests/data/wikitext-2-excerpt.txt").read_bytes()[:4096]
    toks = tokenize(smollm2, text, str(bin_path("tokenize-dump")))[:256]
    assert len(toks) == 256
    m = LlamaTorch(smollm2, n_layer=3, token_ids=toks)
    _, caps = m.forward(toks, capture=True)
    for codec in ("int8", "int4", "int2"):
        for name in ("k_pre", "k_post", "v"):
            kind = name[0]
            errs = []
            for c in caps:
                x = c[name].permute(1, 0, 2).reshape(-1, 32, 64)
                errs.append(check_step_bound(x.contiguous(), kind, codec)[0])
            assert np.mean(errs) <= REAL_NRMSE[codec][kind], (codec, name, errs)
