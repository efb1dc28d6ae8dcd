"""Screening of KV-codec variants before any of them is written in C (docs/KV-CODECS.md, "Variants
screened"): each variant is a round trip (quantize, dequantize) of a chunk's keys and values, applied
under DESIGN.md's attention rule by train/reference.py's forward (reference.FnKV: earlier complete
chunks as the variant decodes them, the own chunk exact), and measured by the mean KL divergence of the
next-token distribution from the exact (f32 KV) model and by perplexity, on moqae-perplexity's windows
of 512 tokens (second halves scored), with its effective bits (codes and metadata of K and V, C = 32,
D = 64). The variants are simulations (round trips only, no packing); `.kv` runs train/kv_codec.py, the
shipped codec, itself. --device cuda runs the forward and the simulated round trips on a GPU.

  python train/codec_study.py -m MODEL.gguf --text wiki.valid.raw --windows 8 --variants 'k4.pre.kv/v4.kv,...'
  python train/codec_study.py -m MODEL.gguf --tokens valid.npy --windows 24 --device cuda --variants ...

Variant names are KEYS/VALUES built from parts (see parse()): e.g. 'k4.pre.hD.mse.x8/v4.hD.g64.mse'; a
'+sink' suffix keeps chunk 0 exact (the sink+ policies).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import time

import numpy as np
import torch

import kv_codec
import reference

C = 32

# ------------------------------------------------------------------------------------------------
# building blocks
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(None)
def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix [n][n] (n a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _had(n: int, like: torch.Tensor, signs: bool = False) -> torch.Tensor:
    """H (orthonormal), or H diag(signs) with fixed pseudo-random signs: rows are x @ M, back is y @ M.T."""
    h = hadamard(n)
    if signs:
        sg = torch.tensor([1.0 if (((i * 0x9E3779B1) >> 7) & 1) else -1.0 for i in range(n)])
        h = sg[:, None] * h
    return h.to(like.device)


def _grid_quant(x, bits, share, search: int, zwin: int, meta: str):
    """Round trip of x [R][N][M] (R records of N groups of M elements), asymmetric b-bit codes.
    meta 'u8': kv_codec's u8 zero/scale codes on per-record grids (scale codes shared by `share`
    consecutive groups); 'f16': f16 scale and zero per group; 'f32': exact.
    search 0: min/max (no clipping); search S > 0: for each run, try the S scale codes from the covering
    one down (each 2^(-1/16) smaller: clipping), and for each group the zero codes around the centred
    one (+-zwin) and the no-clip one; keep the pair of least squared error (decoder unchanged)."""
    R, N, M = x.shape
    qmax = float(2 ** bits - 1)
    lo, hi = x.amin(-1), x.amax(-1)
    if meta != "u8":
        if search:
            best, best_e = None, None
            for f in torch.linspace(1.0, 0.4, 31):  # shrink the range around its centre (search=S ignored)
                for g in (-0.1, -0.05, 0.0, 0.05, 0.1):
                    c = (lo + hi) / 2 + g * (hi - lo)
                    half = (hi - lo) * f / 2
                    z, s = c - half, 2 * half / qmax
                    y = _rt(x, z, s, qmax, meta)
                    e = (y - x).pow(2).sum(-1)
                    if best is None:
                        best, best_e = y, e
                    else:
                        m = e < best_e
                        best = torch.where(m[..., None], y, best)
                        best_e = torch.where(m, e, best_e)
            return best
        return _rt(x, lo, (hi - lo) / qmax, qmax, meta)
    zlo = kv_codec._f16_step(lo.amin(-1), up=False)
    zl = zlo.float()
    zs = kv_codec._f16((lo.amax(-1) - zl) / 255.0).float()
    pos = zs > 0
    zsd = torch.where(pos, zs, 1.0)[:, None]
    t = torch.floor((lo - zl[:, None]) / zsd)
    zc0 = torch.where(pos[:, None], t.clamp(0, 255), 0.0)
    zero0 = zl[:, None] + zs[:, None] * zc0
    need = ((hi - zero0) / qmax).reshape(R, N // share, share).amax(-1)
    sb = kv_codec._f16_step(need.amax(-1).clamp_min(0.0), up=True).float()
    tab = (sb[:, None] * kv_codec.FRAC.to(x.device)[kv_codec._A.to(x.device) & 15][None, :]) * kv_codec._POW.to(x.device)[None, :]
    a0 = ((tab[:, None, :] >= need[:, :, None]).sum(-1) - 1).clamp_min(0)  # [R][N/share]
    if not search:
        s = torch.gather(tab, 1, a0).repeat_interleave(share, 1)
        return _rt(x, zero0, s, qmax, "f32")
    best_y, best_e = None, None
    for da in range(search):
        a = (a0 + da).clamp(max=255)
        s = torch.gather(tab, 1, a).repeat_interleave(share, 1)  # [R][N]
        cen = torch.round(((lo + hi) / 2 - s * qmax / 2 - zl[:, None]) / zsd)
        ys, es = [], []
        cands = [zc0] + [cen + d for d in range(-zwin, zwin + 1)]
        gy, ge = None, None
        for zc in cands:
            zc = torch.where(pos[:, None], zc.clamp(0, 255), 0.0)
            z = zl[:, None] + zs[:, None] * zc
            y = _rt(x, z, s, qmax, "f32")
            e = (y - x).pow(2).sum(-1)
            if gy is None:
                gy, ge = y, e
            else:
                m = e < ge
                gy = torch.where(m[..., None], y, gy)
                ge = torch.where(m, e, ge)
        er = ge.reshape(R, N // share, share).sum(-1).repeat_interleave(share, 1)
        if best_y is None:
            best_y, best_e = gy, er
        else:
            m = er < best_e
            best_y = torch.where(m[..., None], gy, best_y)
            best_e = torch.where(m, er, best_e)
    return best_y


def _rt(x, z, s, qmax, meta):
    if meta == "f16":
        z, s = z.to(torch.float16).float(), s.to(torch.float16).float()
    ok = s > 0
    q = torch.floor((x - z[..., None]) / torch.where(ok, s, 1.0)[..., None] + 0.5).clamp(0, qmax)
    return torch.where(ok[..., None], s[..., None] * q + z[..., None], z[..., None])


# ------------------------------------------------------------------------------------------------
# variants: keys and values of one layer, x [T][H][D] -> what attention sees
# ------------------------------------------------------------------------------------------------

def _chunks(x):
    T, H, D = x.shape
    return x.reshape(T // C, C, H, D).permute(0, 2, 1, 3).reshape(-1, C, D)  # [R][C][D]


def _unchunk(y, T, H, D):
    return y.reshape(T // C, H, C, D).permute(0, 2, 1, 3).reshape(T, H, D)


def parse(spec: str) -> dict:
    """'k4.pre.mse' -> {'bits': 4, 'pre': True, 'mse': 16, ...}. Parts:
    kN / vN (bits; k16 / v16 = f16 copy), pre (keys before RoPE), post (default), kv (the shipped
    kv_codec path), f16 / f32 (metadata), mse[S] (encoder search over S scale codes), g16/g32/g64 (value
    group), tok / grp (value scale code per token / per group), hD / hG (Hadamard on values over head_dim /
    over the group; keys: hD over channels, hC over the chunk's tokens), zw N (zero window)."""
    o = {"bits": int(spec.split(".")[0][1:]), "kind": spec[0], "pre": False, "kv": False, "meta": "u8", "mse": 0,
         "G": 32, "share": "tok", "had": None, "zw": 2, "signs": False, "xout": False, "ksh": 1}
    for p in spec.split(".")[1:]:
        if p == "pre":
            o["pre"] = True
        elif p == "kv":
            o["kv"] = True
        elif p in ("f16", "f32"):
            o["meta"] = p
        elif p.startswith("mse"):
            o["mse"] = int(p[3:] or 16)
        elif p in ("tok", "grp"):
            o["share"] = p
        elif p.startswith("g"):
            o["G"] = int(p[1:])
        elif p in ("hD", "hG", "hC", "hDs", "hGs"):
            o["had"] = p[:2]
            o["signs"] = p.endswith("s")
        elif p in ("x", "x4", "x8"):
            o["xout"] = True
            o["xbits"] = 16 if p == "x" else int(p[1:])
        elif p.startswith("sh"):
            o["ksh"] = int(p[2:])
        elif p.startswith("zw"):
            o["zw"] = int(p[2:])
        else:
            raise ValueError(f"unknown part {p!r} in {spec!r}")
    return o


def bits_of(o: dict, D: int = 64) -> float:
    """Bits per element of one side (K or V) at C = 32."""
    b = o["bits"]
    if b == 16:
        return 16.0
    if o["kind"] == "k":
        n_groups, share = D, o["ksh"]
    else:
        n_groups = C * D // o["G"]
        share = D // o["G"] if o["share"] == "tok" else 1
    x = 0.0
    if o["xout"]:  # the outlier token: index + an f16 row, or a row of codes with an f16 scale and zero
        x = (8 + 16 * D) / (C * D) if o["xbits"] == 16 else (8 + o["xbits"] * D + 32) / (C * D)
    if o["meta"] != "u8":
        return b + 32 * n_groups / (C * D) + x
    return b + (8 * n_groups + 8 * n_groups // share + 48) / (C * D) + x


def _outlier_out(g: torch.Tensor):
    """g [R][C][D]: (index [R] of the token farthest from the chunk's mean, g with that row replaced by
    another token's, so that it leaves the ranges alone)."""
    xi = (g - g.mean(1, keepdim=True)).pow(2).sum(-1).argmax(1)
    ar = torch.arange(g.shape[0], device=g.device)
    g = g.clone()
    g[ar, xi] = g[ar, torch.where(xi == 0, 1, 0)]
    return xi, ar, g


def _outlier_row(row: torch.Tensor, bits: int) -> torch.Tensor:
    """The outlier rows [R][D] as stored: f16, or b-bit codes with an f16 scale and zero per row."""
    if bits == 16:
        return row.half().float()
    return _grid_quant(row[:, None, :], bits, 1, 0, 0, "f16")[:, 0, :]


def round_k(o: dict, k: torch.Tensor) -> torch.Tensor:
    """k: [T][H][D] keys (pre- or post-RoPE as o says) -> round trip."""
    T, H, D = k.shape
    g = _chunks(k)  # [R][C][D]
    if o["bits"] == 16:
        return k.to(torch.float16).float()
    if o["kv"]:
        return _unchunk(kv_codec.roundtrip_k(g, f"int{o['bits']}"), T, H, D)
    g0 = g
    if o["xout"]:  # the token farthest from the chunk's mean key: stored on its own, left out of the ranges
        xi, ar, g = _outlier_out(g)
    S = o["signs"]
    if o["had"] == "hD":
        g = g @ _had(D, g, S)
    elif o["had"] == "hC":
        g = _had(C, g) @ g
    y = _grid_quant(g.transpose(1, 2).contiguous(), o["bits"], o["ksh"], o["mse"], o["zw"], o["meta"]).transpose(1, 2)
    if o["xout"]:
        y = y.clone()
        y[ar, xi] = _outlier_row((g0[ar, xi] @ _had(D, g, S)) if o["had"] == "hD" else g0[ar, xi], o["xbits"])
    if o["had"] == "hD":
        y = y @ _had(D, y, S).T
    elif o["had"] == "hC":
        y = _had(C, y).T @ y
    return _unchunk(y, T, H, D)


def round_v(o: dict, v: torch.Tensor) -> torch.Tensor:
    T, H, D = v.shape
    g = _chunks(v)
    if o["bits"] == 16:
        return v.to(torch.float16).float()
    G = o["G"]
    if o["kv"]:
        return _unchunk(kv_codec.roundtrip_v(g, f"int{o['bits']}", G), T, H, D)
    R = g.shape[0]
    S = o["signs"]
    if o["had"] == "hD":
        g = g @ _had(D, g, S)
    elif o["had"] == "hG":
        g = (g.reshape(R, C, D // G, G) @ _had(G, g, S)).reshape(R, C, D)
    if o["xout"]:
        g0 = g
        xi, ar, g = _outlier_out(g)
    share = D // G if o["share"] == "tok" else 1
    y = _grid_quant(g.reshape(R, C * D // G, G), o["bits"], share, o["mse"], o["zw"], o["meta"]).reshape(R, C, D)
    if o["xout"]:
        y = y.clone()
        y[ar, xi] = _outlier_row(g0[ar, xi], o["xbits"])
    if o["had"] == "hD":
        y = y @ _had(D, y, S).T
    elif o["had"] == "hG":
        y = (y.reshape(R, C, D // G, G) @ _had(G, y, S).T).reshape(R, C, D)
    return _unchunk(y, T, H, D)


def kv_fn(model, spec: str, T: int):
    """FnKV callback: round trips on the CPU in f32 (where kv_codec is exact), attention on model's device."""
    sink = spec.endswith("+sink")
    ks, vs = spec.removesuffix("+sink").split("/")
    ko, vo = parse(ks), parse(vs)
    cs = model.rope_table(T)

    def fn(il, k_pre, k_post, v):
        dev = k_pre.device
        kdev = "cpu" if ko["kv"] else dev
        vdev = "cpu" if vo["kv"] else dev
        if ko["pre"]:
            kd = model.rope(round_k(ko, k_pre.float().to(kdev)).to(dev), cs)
        else:
            kd = round_k(ko, k_post.float().to(kdev)).to(dev)
        vd = round_v(vo, v.float().to(vdev)).to(dev)
        if sink:  # chunk 0 in FP16 (the policy sink+...)
            kd, vd = kd.clone(), vd.clone()
            kd[:C], vd[:C] = k_post[:C].half().float(), v[:C].half().float()
        return kd, vd
    return fn


def eff_bits(spec: str) -> float:
    ks, vs = spec.removesuffix("+sink").split("/")
    b = (bits_of(parse(ks)) + bits_of(parse(vs))) / 2
    return (16 + 15 * b) / 16 if spec.endswith("+sink") else b  # sink: 1 chunk of 16 at 512 tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--text", help="text file (tokenized by the runtime's tokenizer)")
    ap.add_argument("--tokens", help="or a .npy of token ids (as tokenize-dump gives them)")
    ap.add_argument("--bos", type=int, default=None, help="BOS id when the model adds one (--tokens only)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--first-window", type=int, default=0)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--variants", required=True, help="comma-separated KEYS/VALUES specs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    T = 512
    n_tok = T * (a.first_window + a.windows)
    if a.tokens:
        toks = np.load(a.tokens).tolist()[:n_tok]
        bos = a.bos
    else:
        with open(a.text, "rb") as f:
            toks = reference.tokenize(a.model, f.read(n_tok * 8), a.tokenizer)[:n_tok]
        info = reference.tokenizer_info(a.model, a.tokenizer)
        bos = info["bos"] if info["add_bos"] else None  # as moqae_perplexity's windows
    m = reference.LlamaModel(a.model, device=a.device)
    variants = a.variants.split(",")
    res = {v: [0.0, 0, 0.0] for v in variants}
    base = [0.0, 0]
    first = T // 2
    rows = slice(first, T - 1)
    t0 = time.time()
    with torch.no_grad():
        for w in range(a.first_window, a.first_window + a.windows):
            win = reference.ppl_window(toks, T, w, bos)
            tgt = torch.as_tensor(toks[w * T + first + 1:(w + 1) * T])
            blp = torch.log_softmax(m.forward(win, logits_rows=rows).double().cpu(), dim=-1)
            base[0] += float(-blp[torch.arange(len(tgt)), tgt].sum())
            base[1] += len(tgt)
            for var in variants:
                kv = reference.FnKV(chunk=C, fn=kv_fn(m, var, T))
                lp = torch.log_softmax(m.forward(win, kv=kv, logits_rows=rows).double().cpu(), dim=-1)
                r = res[var]
                r[0] += float(-lp[torch.arange(len(tgt)), tgt].sum())
                r[1] += len(tgt)
                r[2] += float((blp.exp() * (blp - lp)).sum())
            print(f"window {w} done ({time.time() - t0:.0f} s)", flush=True)
            if (w + 1 - a.first_window) % 8 == 0 or w + 1 == a.first_window + a.windows:
                table(variants, res, base, w + 1 - a.first_window, a.first_window)


def table(variants, res, base, n_win, w0):
    pb = math.exp(base[0] / base[1])
    print(f"\n{n_win} windows from {w0}, exact PPL {pb:.4f}\n")
    print("| keys/values | effective bits | PPL | vs exact | KL (nats/token) |")
    print("| --- | --- | --- | --- | --- |")
    for var in variants:
        r = res[var]
        p = math.exp(r[0] / r[1])
        print(f"| {var} | {eff_bits(var):.3f} | {p:.4f} | {(p / pb - 1) * 100:+.2f}% | {r[2] / r[1]:.5f} |", flush=True)


if __name__ == "__main__":
    main()
