"""attention_mass.py — the attention-mass baseline of issue 6: in each window, the chunks that receive the
most attention keep INT4 and the others take INT2 (chunk 0, the sink, stays FP16), at a given fraction of
INT4 chunks. Perplexity through the PyTorch reference (train/reference.py, the runtime's attention rule and
codecs; its PPL equals the runtime's within 0.5%, docs/RESULTS.md "Parity"), scored as moqae-perplexity
scores (second half of each window).

The mass a chunk receives is measured in an FP16 forward of the whole window: the softmax weights on the
chunk's keys, summed over every query of the window, every head and (default) every layer; --per-layer
ranks the chunks of each layer by that layer's mass alone (a decision per chunk and layer). Queries that
come after a chunk is stored are used too, so this is an oracle-like policy: a runtime could only count
the mass received so far. Writes a JSON list of points for bench/router_curves.py --extra.

  python bench/attention_mass.py -m MODEL -f wiki.test.raw -c 2048 --chunks 4 --int4 0.2,0.4,0.6 -o mass.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))
from reference import (CODEC_INDEX, HardKV, LlamaModel, default_codec_backend, default_key_store, kv_bits,  # noqa: E402
                       ppl_tokens, ppl_window, window_nll)


def chunk_mass(model: LlamaModel, win: list, C: int) -> torch.Tensor:
    """[n_layer][n_chunks] attention mass each complete chunk of the window receives, per layer (FP16
    cache: the window's own keys, causal)."""
    hp = model.hp
    with torch.no_grad():
        _, caps = model.forward(win, capture=True, logits_rows=slice(0, 1))
    T = len(win)
    n_c = T // C
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    out = torch.zeros(hp.n_layer, n_c, dtype=torch.float64)
    for il, cap in enumerate(caps):
        q = cap["q"].transpose(0, 1)  # [H][T][D]
        k = cap["k_post"].transpose(0, 1).repeat_interleave(hp.n_head // hp.n_head_kv, dim=0)
        s = (q @ k.transpose(1, 2)) / math.sqrt(hp.head_dim)
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
        recv = p.sum(dim=(0, 1)).double()  # [T] over heads and queries
        out[il] = recv[:n_c * C].reshape(n_c, C).sum(dim=1)
    return out


def assignment(mass: torch.Tensor, frac: float, per_layer: bool) -> torch.Tensor:
    """[1][n_chunks][n_layer] codec indices: chunk 0 FP16; of the others the round(frac * n) with the most
    mass INT4 (per layer, or by the sum over layers), the rest INT2."""
    n_layer, n_c = mass.shape
    a = torch.full((1, n_c, n_layer), CODEC_INDEX["int2"], dtype=torch.long)
    a[0, 0] = CODEC_INDEX["fp16"]
    k = round(frac * (n_c - 1))
    if k == 0:
        return a
    rows = [mass[il] for il in range(n_layer)] if per_layer else [mass.sum(dim=0)]
    for j, m in enumerate(rows):
        top = torch.topk(m[1:], k).indices + 1
        if per_layer:
            a[0, top, j] = CODEC_INDEX["int4"]
        else:
            a[0, top, :] = CODEC_INDEX["int4"]
    return a


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", required=True)
    ap.add_argument("-c", "--ctx-size", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=4, help="windows")
    ap.add_argument("--int4", default="0.2,0.4,0.6", help="fractions of the non-sink chunks kept at INT4")
    ap.add_argument("--per-layer", action="store_true", help="rank the chunks of each layer by its own mass")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    C, n_ctx = 32, a.ctx_size
    fracs = [float(x) for x in a.int4.split(",") if x]
    with open(a.file, "rb") as f:
        tokens, bos = ppl_tokens(a.model, f.read(), n_ctx, a.chunks)
    if len(tokens) < n_ctx * a.chunks:
        sys.exit(f"error: the text has {len(tokens)} tokens, fewer than {a.chunks} windows of {n_ctx}")
    model = LlamaModel(a.model)
    nll = {f: [] for f in fracs}
    bits = {f: [] for f in fracs}
    t0 = time.time()
    for ci in range(a.chunks):
        win = ppl_window(tokens, n_ctx, ci, bos)
        mass = chunk_mass(model, win, C)
        for f in fracs:
            asg = assignment(mass, f, a.per_layer)
            kv = HardKV(chunk=C, key_store=default_key_store(), assign=asg, codec=default_codec_backend())
            with torch.no_grad():
                nll[f].append(window_nll(model, tokens, n_ctx, ci, bos, kv))
            bits[f].append(kv_bits(asg[0], n_ctx, C, model.hp.n_head_kv, model.hp.head_dim))
        print(f"attention_mass: window {ci + 1}/{a.chunks} done, {time.time() - t0:.0f} s", file=sys.stderr)
    points = []
    tag = "per layer" if a.per_layer else "shared"
    for f in fracs:
        v = np.concatenate(nll[f])
        p = {"name": f"attention mass ({tag}) {int(round(100 * f))}% int4", "kind": "attention-mass",
             "ppl": float(math.exp(v.mean())), "nominal_bits": float(np.mean([b[0] for b in bits[f]])),
             "effective_bits": float(np.mean([b[1] for b in bits[f]])), "windows": a.chunks,
             "command": f"python bench/attention_mass.py -m MODEL -f {os.path.basename(a.file)} -c {n_ctx} "
                        f"--chunks {a.chunks} --int4 {f}" + (" --per-layer" if a.per_layer else "")}
        points.append(p)
        print(f"{p['name']:40s} PPL {p['ppl']:9.4f}  nominal {p['nominal_bits']:6.3f}  effective "
              f"{p['effective_bits']:6.3f}", flush=True)
    with open(a.out, "w") as f:
        json.dump(points, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
