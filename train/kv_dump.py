"""The KV-codec measurements of docs/KV-CODECS.md on real K/V: dump per-layer queries, keys (before and
after RoPE) and values of a text, the round-trip and score-error tables, and perplexities under codec
*variants* (train/kv_codec.py's codecs plus the metadata alternatives measured against them: f16 scale
and zero, a value group of 64, a scale code per value group, a key scale shared by a channel pair).
The forward is train/reference.py's (the one reference): `LlamaTorch` below only keeps this script's
older call style (a kv_fn callback; the own chunk exact f32, the comparison being against the exact
model), which train/codec_study.py also uses. Tokenization goes through the runtime's tokenizer.

  python train/kv_dump.py -m MODEL.gguf --text wiki.valid.raw -n 512 -o kv.npz        # dump K/V
  python train/kv_dump.py -m MODEL.gguf --text wiki.valid.raw -n 512 --measure        # error tables
  python train/kv_dump.py -m MODEL.gguf --text wiki.valid.raw --ppl 4 --variants ...   # perplexities
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import kv_codec
from reference import FnKV, LlamaModel, nll, tokenize  # noqa: F401  (nll, tokenize: used by codec_study.py)


class LlamaTorch(LlamaModel):
    """reference.LlamaModel with this script's call style: forward(tokens, kv_fn, chunk, capture) on one
    sequence, rope(x, pos) on [T][heads][head_dim] with contiguous positions; f32 activations (no 8-bit
    activation simulation) unless act_quant=True, as the measurements of docs/KV-CODECS.md were taken."""

    def __init__(self, path: str, n_layer: int | None = None, token_ids=None, act_quant: bool = False, **kw):
        super().__init__(path, n_layer=n_layer, token_ids=token_ids, act_quant=act_quant, **kw)

    def rope(self, x, pos_or_cs):
        if isinstance(pos_or_cs, tuple):  # reference.LlamaModel's own call
            return super().rope(x, pos_or_cs)
        pos = np.asarray(pos_or_cs)
        return super().rope(x, self.rope_table(len(pos), int(pos[0]) if len(pos) else 0))

    @torch.no_grad()
    def forward(self, tokens, kv_fn=None, chunk: int = 32, capture: bool = False, kv=None, logits_rows=None):
        """Logits [T][n_vocab]. kv_fn(layer, k_pre, k_post, v) -> (k_used, v_used), all [T][n_head_kv][head_dim]:
        what a query sees for keys/values of earlier complete chunks (its own chunk stays exact).
        capture: also return per-layer dicts q, k_pre, k_post, v."""
        if kv is None and kv_fn is not None:
            kv = FnKV(chunk=chunk, fn=kv_fn)
        return super().forward(tokens, kv=kv, logits_rows=logits_rows, capture=capture)


# ------------------------------------------------------------------------------------------------
# codec variants: "K/V" names, e.g. "int4-pre/int4" (keys quantized before RoPE, values int4);
# suffixes choose the alternatives measured against the shipped layout
# ------------------------------------------------------------------------------------------------

def _alt_groups(x: torch.Tensor, bits: int, meta: str, share: int) -> torch.Tensor:
    """Round trip of [R][N][M] groups under an alternative metadata: 'f16' (f16 scale and zero per group)
    or 'u8' (kv_codec's u8 codes with f16 bases, scale codes shared by `share` groups)."""
    R, N, M = x.shape
    if meta == "u8":
        q, zc, sc, bases = kv_codec._quantize(x, bits, share)
        return kv_codec._dequantize(q, zc, sc, bases, share)
    qmax = float(2 ** bits - 1)
    lo, hi = x.amin(-1), x.amax(-1)
    z = lo.to(torch.float16).float()
    sc = ((hi - z) / qmax).to(torch.float16).float()
    ok = sc > 0
    q = torch.floor((x - z[..., None]) / torch.where(ok, sc, 1.0)[..., None] + 0.5)
    q = torch.where(ok[..., None], q.clamp(0, qmax), 0.0)
    return sc[..., None] * q + z[..., None]


def variant_k(x: torch.Tensor, spec: str, C: int = 32) -> torch.Tensor:
    """x: [T][H][D] keys (T a multiple of C). spec: fp16 | int8 | int4 | int2, then optional
    ':f16' (f16 scale/zero) or ':pair' (one scale code per channel pair (2i, 2i+1))."""
    T, H, D = x.shape
    codec, _, alt = spec.partition(":")
    g = x.reshape(T // C, C, H, D).permute(0, 2, 1, 3).reshape(-1, C, D)
    if codec == "fp16" or not alt:
        y = kv_codec.roundtrip_k(g, codec)
    else:
        y = _alt_groups(g.transpose(1, 2), kv_codec.CODEC_BITS[codec], "f16" if alt == "f16" else "u8",
                        2 if alt == "pair" else 1).transpose(1, 2)
    return y.reshape(T // C, H, C, D).permute(0, 2, 1, 3).reshape(T, H, D)


def variant_v(x: torch.Tensor, spec: str, C: int = 32) -> torch.Tensor:
    """x: [T][H][D] values. spec: codec, then optional ':f16' (f16 scale and zero per group), ':g64'
    (group 64), ':grp' (a scale code per group, not one per token), combinable as ':grp:g64'."""
    T, H, D = x.shape
    codec, *alts = spec.split(":")
    G = 64 if "g64" in alts else kv_codec.V_GROUP if not alts else 32  # the alternatives were measured at G 32
    g = x.reshape(T // C, C, H, D).permute(0, 2, 1, 3).reshape(-1, C, D)
    if codec == "fp16" or set(alts) <= {"g64"}:
        y = kv_codec.roundtrip_v(g, codec, G)
    else:
        y = _alt_groups(g.reshape(g.shape[0], C * D // G, G), kv_codec.CODEC_BITS[codec],
                        "f16" if "f16" in alts else "u8", 1).reshape(g.shape)
    return y.reshape(T // C, H, C, D).permute(0, 2, 1, 3).reshape(T, H, D)


def variant_bits(kspec: str, vspec: str, C: int = 32, D: int = 64) -> float:
    """Effective bits per element of K and V together for a variant."""
    def meta_bits(spec, n_groups, kind):
        codec, *alts = spec.split(":")
        if codec == "fp16":
            return 16 * C * D
        if not alts:  # the shipped codec (rotation, outlier token, search): its exact record size
            nbytes = kv_codec.k_bytes(codec, C, D) if kind == "k" else kv_codec.v_bytes(codec, C, D)
            return 8 * nbytes
        b = kv_codec.CODEC_BITS[codec] * C * D
        if "f16" in alts:
            return b + 32 * n_groups
        G = 64 if "g64" in alts else 32
        share = 2 if "pair" in alts else 1 if kind == "k" or "grp" in alts else D // G
        return b + 8 * n_groups + 8 * n_groups // share + 48
    kb = meta_bits(kspec.replace("-pre", ""), D, "k")
    G = 64 if "g64" in vspec else 32
    vb = meta_bits(vspec, C * D // G, "v")
    return (kb + vb) / (2 * C * D)


def kv_fn_for(model: LlamaTorch, kspec: str, vspec: str, T: int, C: int = 32):
    """A forward kv_fn: keys 'int4' (after RoPE) or 'int4-pre' (quantized before RoPE, rotated after)."""
    pos = np.arange(T)

    def fn(il, k_pre, k_post, v):
        if kspec.endswith("-pre") or "-pre:" in kspec:
            kd = model.rope(variant_k(k_pre, kspec.replace("-pre", ""), C), pos)
        else:
            kd = variant_k(k_post, kspec, C)
        return kd, variant_v(v, vspec, C)
    return fn


def _nrmse(y, x):
    return float((y - x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt())


def measure(model: LlamaTorch, toks: list, C: int = 32):
    """Markdown tables: round-trip errors (random and real K/V), score errors before/after RoPE,
    metadata alternatives, effective bits."""
    _, caps = model.forward(toks, capture=True)
    T = len(toks) // C * C
    hp = model.hp
    grp = hp.n_head // hp.n_head_kv
    q = torch.stack([c["q"][:T] for c in caps])
    kpre = torch.stack([c["k_pre"][:T] for c in caps])
    kpost = torch.stack([c["k_post"][:T] for c in caps])
    v = torch.stack([c["v"][:T] for c in caps])
    L = len(caps)
    pos = np.arange(T)
    gen = torch.Generator().manual_seed(0)
    rnd = torch.randn((T, hp.n_head_kv, hp.head_dim), generator=gen)

    def group_err(x, y, kind):
        """max |y - x| / (range of the group) over all groups."""
        Tn, H, D = x.shape
        xs = x.reshape(Tn // C, C, H, D)
        ys = y.reshape(Tn // C, C, H, D)
        if kind == "k":
            r = xs.amax(1, keepdim=True) - xs.amin(1, keepdim=True)
        else:
            xg = xs.reshape(Tn // C, C, H, D // kv_codec.V_GROUP, kv_codec.V_GROUP)
            r = (xg.amax(-1, keepdim=True) - xg.amin(-1, keepdim=True)).expand_as(xg).reshape(xs.shape)
        return float(((ys - xs).abs() / r.clamp_min(1e-30)).max())

    print(f"### Round trip (C={C}, D={hp.head_dim}, G={kv_codec.V_GROUP}): NRMSE = rmse/rms(x); max = max|err|/group range\n")
    print("| codec | random K | random V | real K pre-RoPE | real K post-RoPE | real V | max (real K post) | max (real V) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for codec in ("fp16", "int8", "int4", "int2"):
        r = [_nrmse(variant_k(rnd, codec, C), rnd), _nrmse(variant_v(rnd, codec, C), rnd)]
        ek = [_nrmse(variant_k(kpre[l], codec, C), kpre[l]) for l in range(L)]
        ep = [_nrmse(variant_k(kpost[l], codec, C), kpost[l]) for l in range(L)]
        ev = [_nrmse(variant_v(v[l], codec, C), v[l]) for l in range(L)]
        mk = max(group_err(kpost[l], variant_k(kpost[l], codec, C), "k") for l in range(L))
        mv = max(group_err(v[l], variant_v(v[l], codec, C), "v") for l in range(L))
        print(f"| {codec} | {r[0]:.4f} | {r[1]:.4f} | {np.mean(ek):.4f} | {np.mean(ep):.4f} | {np.mean(ev):.4f} | {mk:.4f} | {mv:.4f} |")

    print("\n### Attention scores q.k/sqrt(D), keys quantized before vs after RoPE (causal pairs, all layers and heads)\n")
    print("| codec | score RMSE pre-RoPE | score RMSE post-RoPE | post/pre | score std |")
    print("| --- | --- | --- | --- | --- |")
    hk = torch.arange(hp.n_head) // grp
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool), -1)
    for codec in ("int8", "int4", "int2"):
        e_pre, e_post, sd = [], [], []
        for l in range(L):
            s_ex = torch.einsum("thd,shd->hts", q[l], kpost[l][:, hk]) / np.sqrt(hp.head_dim)
            k1 = model.rope(variant_k(kpre[l], codec, C), pos)
            k2 = variant_k(kpost[l], codec, C)
            for kd, acc in ((k1, e_pre), (k2, e_post)):
                s_q = torch.einsum("thd,shd->hts", q[l], kd[:, hk]) / np.sqrt(hp.head_dim)
                acc.append(float((s_q - s_ex)[:, mask].pow(2).mean().sqrt()))
            sd.append(float(s_ex[:, mask].std()))
        print(f"| {codec} | {np.mean(e_pre):.4f} | {np.mean(e_post):.4f} | {np.mean(e_post) / np.mean(e_pre):.2f} | {np.mean(sd):.3f} |")

    print(f"\n### Metadata alternatives at int4 (C={C}, D={hp.head_dim}): NRMSE on real K (pre-RoPE) and V\n")
    print("| keys | values | K NRMSE | V NRMSE | effective bits (K+V) |")
    print("| --- | --- | --- | --- | --- |")
    for ks, vs in (("int4:f16", "int4:f16"), ("int4:f16", "int4:f16:g64"), ("int4", "int4:grp"),
                   ("int4:pair", "int4:grp"), ("int4", "int4"), ("int4", "int4:grp:g64")):
        ek = np.mean([_nrmse(variant_k(kpre[l], ks, C), kpre[l]) for l in range(L)])
        ev = np.mean([_nrmse(variant_v(v[l], vs, C), v[l]) for l in range(L)])
        print(f"| {ks} | {vs} | {ek:.4f} | {ev:.4f} | {variant_bits(ks, vs, C, hp.head_dim):.3f} |")

    print("\n### Record sizes (bytes per layer, KV head and chunk) and effective bits\n")
    print("| codec | C | D | K bytes | V bytes | effective bits |")
    print("| --- | --- | --- | --- | --- | --- |")
    for C_, D_ in ((32, 64), (64, 64), (32, 128), (64, 128)):
        for codec in ("fp16", "int8", "int4", "int2"):
            print(f"| {codec} | {C_} | {D_} | {kv_codec.k_bytes(codec, C_, D_)} | {kv_codec.v_bytes(codec, C_, D_)} | "
                  f"{kv_codec.effective_bits(codec, C_, D_):.3f} |")


def ppl(model: LlamaTorch, toks: list, variants: list, n_win: int, T: int = 512, w0: int = 0):
    """Perplexity of each 'KSPEC/VSPEC' variant ('fp16/fp16' first, the baseline) on n_win windows of T
    tokens, scoring the second half of each window, and the mean KL divergence of each variant's
    next-token distribution from the baseline's over the same tokens (far less noisy than PPL
    differences on a few windows). Prints running sums per window and the final table."""
    res = {k: [0.0, 0, 0.0] for k in variants}  # NLL sum, count, KL sum
    for w in range(w0, w0 + n_win):
        tw = toks[w * T:(w + 1) * T]
        base_lp = None
        for var in variants:
            ks, vs = var.split("/")
            fn = None if var == "fp16/fp16" else kv_fn_for(model, ks, vs, T)
            logits = model.forward(tw, kv_fn=fn)
            s_, n_ = nll(logits, tw, first=T // 2)
            lp = torch.log_softmax(logits[T // 2:-1].double(), dim=-1)
            if base_lp is None:
                base_lp = lp
            res[var][0] += s_
            res[var][1] += n_
            res[var][2] += float((base_lp.exp() * (base_lp - lp)).sum())
        print(f"window {w}: " + " ".join(f"{k}={res[k][0]:.3f}/{res[k][1]},kl={res[k][2]:.4f}" for k in variants),
              flush=True)
    base = np.exp(res[variants[0]][0] / res[variants[0]][1])
    print(f"\n| keys/values | effective bits | PPL | vs {variants[0]} | mean KL from {variants[0]} (nats/token) |")
    print("| --- | --- | --- | --- | --- |")
    for var in variants:
        p_ = np.exp(res[var][0] / res[var][1])
        ks, vs = var.split("/")
        print(f"| {var} | {variant_bits(ks, vs):.3f} | {p_:.3f} | {(p_ / base - 1) * 100:+.2f}% | "
              f"{res[var][2] / res[var][1]:.5f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("-n", type=int, default=512, help="tokens")
    ap.add_argument("--offset", type=int, default=0, help="byte offset into the text")
    ap.add_argument("--tokenizer", default="build/tokenize-dump")
    ap.add_argument("-o", "--out", help=".npz with q, k_pre, k_post, v: [n_layer][T][heads][head_dim]")
    ap.add_argument("--measure", action="store_true", help="print the error tables of docs/KV-CODECS.md")
    ap.add_argument("--ppl", type=int, default=0, help="perplexity over this many windows of 512 tokens")
    ap.add_argument("--first-window", type=int, default=0)
    ap.add_argument("--variants", default="fp16/fp16,int8-pre/int8,int4-pre/int4,int4/int4,int2-pre/int2,int2/int2",
                    help="comma-separated KSPEC/VSPEC (see variant_k, variant_v; '-pre': keys before RoPE)")
    a = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    n_tok = a.n if not a.ppl else 512 * (a.first_window + a.ppl)
    with open(a.text, "rb") as f:
        f.seek(a.offset)
        text = f.read(n_tok * 8)
    toks = tokenize(a.model, text, a.tokenizer)[:n_tok]
    m = LlamaTorch(a.model)
    if a.ppl:
        ppl(m, toks, a.variants.split(","), a.ppl, w0=a.first_window)
    if a.measure:
        measure(m, toks)
    if a.out:
        _, caps = m.forward(toks, capture=True)
        np.savez(a.out, tokens=np.asarray(toks), **{k: np.stack([c[k].numpy() for c in caps]) for k in caps[0]})


if __name__ == "__main__":
    main()
