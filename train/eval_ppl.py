"""eval_ppl.py — perplexity of a text under the PyTorch reference (train/reference.py), scored exactly as
build/moqae-perplexity scores it (runtime/src/api.c moqae_perplexity): the runtime's tokenizer
(build/tokenize-dump, BOS as the model says), consecutive windows of -c tokens, the KV cleared before
each, the window's first token replaced by BOS when the model adds one, the second half scored. The KV
cache follows the attention rule with a fixed --kv policy or a --router file (docs/ROUTER-FORMAT.md).

  python train/eval_ppl.py -m MODEL.gguf -f wiki.test.raw -c 512 --chunks 16 --kv sink+int4
  python train/eval_ppl.py -m MODEL.gguf -f wiki.test.raw -c 512 --chunks 16 --router r.gguf --decisions d.tsv

Prints the running estimate per window and "Final estimate: PPL = X +/- Y" (the runtime's format), the
bits (nominal and effective, as moqae_kv_stats counts them, averaged over windows), and the expert
histogram. --decisions writes one line per (window, chunk, router): `window chunk router codec`, for
decision parity with the runtime. --exact: an unquantized f32 KV cache (no rule), for comparison.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

# Before torch is imported: OpenMP threads that sleep when idle instead of spinning. With active waiting
# (libgomp's default) every op of a 2-thread run stalls whenever another process holds a core: 6-10x
# slower on this shared 2-core machine (docs/TRAINING.md, "Cost").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import (CODECS, POLICIES, HardKV, LlamaModel, default_codec_backend, default_key_store,  # noqa: E402
                       kv_bits, policy_assign, ppl_tokens, window_nll)


def window_assign(model, router, policy, win, C):
    """(assign [1][n_chunks][n_layer] codec indices, decisions [n_router][n_chunks] codec names) of one
    window under a router or a fixed policy."""
    n_c = len(win) // C
    if router is None:
        a = policy_assign(policy, 1, n_c, model.hp.n_layer)
        return a, [[CODECS[c] for c in a[0, :, 0].tolist()]]
    x = model.embed(torch.as_tensor(win)[None])
    dec = router.decisions(x)  # [1][G][n_c] expert indices
    a = router.assignment(dec)
    gs = router.cfg.group_size
    return a, [[CODECS[c] for c in a[0, :, g * gs].tolist()] for g in range(router.cfg.n_router)]


def evaluate(model, tokens, n_ctx, n_chunks, bos, C=32, policy="fp16", router=None, exact=False, key_store=None,
             progress=None, decisions_out=None, codec=None):
    """moqae_perplexity over the reference. Returns a dict: ppl, ppl_err, nll, n_scored, n_windows, nominal,
    effective (bits, mean over windows), hist {codec: decisions}, records {codec: (chunk, layer) records}."""
    n_max = len(tokens) // n_ctx
    if n_max < 1:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {n_ctx}")
    n_win = min(n_chunks, n_max) if n_chunks > 0 else n_max
    s = s2 = 0.0
    count = 0
    bits = []
    hist = {c: 0 for c in CODECS}
    records = {c: 0 for c in CODECS}
    for ci in range(n_win):
        win = tokens[ci * n_ctx:(ci + 1) * n_ctx]
        if bos is not None:
            win = [bos] + win[1:]
        a, dec = window_assign(model, router, policy, win, C)
        kv = None if exact else HardKV(chunk=C, key_store=key_store or default_key_store(), assign=a,
                                       codec=codec or default_codec_backend())
        v = window_nll(model, tokens, n_ctx, ci, bos, kv)
        s += float(v.sum())
        s2 += float((v * v).sum())
        count += len(v)
        bits.append(kv_bits(a[0], n_ctx, C, model.hp.n_head_kv, model.hp.head_dim))
        for g, row in enumerate(dec):
            for c, name in enumerate(row):
                hist[name] += 1
                if decisions_out is not None:
                    decisions_out.write(f"{ci}\t{c}\t{g}\t{name}\n")
        for c in a[0].flatten().tolist():
            records[CODECS[c]] += 1
        if progress:
            progress(ci, n_win, math.exp(s / count))
    mean = s / count
    var = s2 / count - mean * mean
    ppl = math.exp(mean)
    return {"ppl": ppl, "ppl_err": ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0,
            "nll": mean, "n_scored": count, "n_windows": n_win, "nominal": float(np.mean([b[0] for b in bits])),
            "effective": float(np.mean([b[1] for b in bits])), "hist": hist, "records": records}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", required=True)
    ap.add_argument("-c", "--ctx-size", type=int, default=512, help="window size in tokens")
    ap.add_argument("--chunks", type=int, default=0, help="score at most this many windows (0: all)")
    ap.add_argument("--kv", default="fp16", choices=list(POLICIES), help="fixed KV policy")
    ap.add_argument("--kv-chunk", type=int, default=32, choices=(32, 64), help="C for a fixed policy")
    ap.add_argument("--router", help="router GGUF (docs/ROUTER-FORMAT.md); overrides --kv and --kv-chunk")
    ap.add_argument("--exact", action="store_true", help="exact f32 KV cache (no attention rule)")
    ap.add_argument("--key-store", default=default_key_store(), choices=("pre", "post"),
                    help="quantized records hold keys before RoPE (the runtime's default) or after; default as "
                         "the runtime: pre unless MOQAE_KV_KEYS=post")
    ap.add_argument("--codec", default=default_codec_backend(), choices=("torch", "c"),
                    help="who codes the chunks: train/kv_codec.py (torch, the default) or the runtime's encoder "
                         "through build/kv-codec-dump (c: the same bytes, faster)")
    ap.add_argument("--decisions", help="write `window chunk router codec` lines here")
    ap.add_argument("--tokenizer", default=None, help="tokenize-dump (default: build/tokenize-dump)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    with open(a.file, "rb") as f:
        text = f.read()
    if not text:
        sys.exit(f"error: text file '{a.file}' is empty")
    n_ctx = a.ctx_size
    # tokenize only what the windows need (the tokenizer is fast, but files can be large)
    tokens, bos = ppl_tokens(a.model, text, n_ctx, a.chunks, a.tokenizer)
    print(f"eval_ppl: tokenized into {len(tokens)} tokens", file=sys.stderr)
    if len(tokens) < 2 * n_ctx:
        sys.exit(f"error: need at least {2 * n_ctx} tokens (2 windows of -c {n_ctx}), the text has {len(tokens)}")
    model = LlamaModel(a.model)
    router = None
    C = a.kv_chunk
    label = "exact" if a.exact else a.kv
    if a.router:
        from router import load_router

        router, meta = load_router(a.router, model)
        C = router.cfg.chunk
        label = f"router {os.path.basename(a.router)} (experts {','.join(router.cfg.experts)}, " \
                f"{router.cfg.n_router} router(s), expected_bits {meta['expected_bits']:.2f})"
    out = open(a.decisions, "w") if a.decisions else None
    if out:
        out.write("# window\tchunk\trouter\tcodec\n")

    def progress(ci, n, ppl):
        if ci == 0:
            print(f"eval_ppl: {time.time() - t0:.1f} s to the first window, {n} windows", file=sys.stderr)
        print(f"[{ci + 1}]{ppl:.4f},", end="", flush=True)

    r = evaluate(model, tokens, n_ctx, a.chunks, bos, C=C, policy=a.kv, router=router, exact=a.exact,
                 key_store=a.key_store, progress=progress, decisions_out=out, codec=a.codec)
    if out:
        out.close()
    print()
    print(f"eval_ppl: {r['n_windows']} windows, {r['n_scored']} tokens scored in {time.time() - t0:.1f} s",
          file=sys.stderr)
    print(f"kv: {label}, C {C}, keys stored {a.key_store}-RoPE; decisions fp16 {r['hist']['fp16']} int8 "
          f"{r['hist']['int8']} int4 {r['hist']['int4']} int2 {r['hist']['int2']}; records fp16 "
          f"{r['records']['fp16']} int8 {r['records']['int8']} int4 {r['records']['int4']} int2 {r['records']['int2']}; "
          f"{r['nominal']:.3f} nominal / {r['effective']:.3f} effective bits (mean over windows)")
    print(f"Final estimate: PPL = {r['ppl']:.4f} +/- {r['ppl_err']:.5f}")
    return r


if __name__ == "__main__":
    main()
