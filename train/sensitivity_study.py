"""sensitivity_study.py — how much a router could gain, and how much of it layer 0's input can see, from the
per-chunk sensitivities measured by sensitivity.py (train_router.py --sens-cache writes the same file).

  python train/sensitivity_study.py -m MODEL.gguf --calib wiki.valid.raw --sens sens.pt

Prints, for the pooled windows: the spread of each chunk's linearised NLL change from INT4 to INT2 (summed
over layers, per token that sees the chunk), the NLL change per scored token of an oracle that stores the
least sensitive quarter / half / three quarters of the routed chunks in INT2 (in-sample: the ceiling of
any router) against chunks taken at random, and how well the chunk-mean of the router's input (the
RMS-normalised token embeddings) predicts the sensitivity: the correlation of a ridge regression under
4-fold cross-validation by window.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import LlamaModel, tokenize, tokenizer_info  # noqa: E402
from train_router import routed_chunks, windows_of  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--calib", required=True, help="the text the sensitivities were measured on")
    ap.add_argument("--sens", required=True)
    ap.add_argument("--layers", default="",
                    help="also try deeper inputs: the chunk-mean of the attention queries at these layers (comma list)")
    a = ap.parse_args(argv)
    s = torch.load(a.sens)
    experts, C, T, ids = s["experts"], s["chunk"], s["seq_len"], s["ids"]
    j4, j2 = experts.index("int4"), experts.index("int2")
    d = (s["S"][..., j2] - s["S"][..., j4]).sum(1)  # [N][n_c] nats per window
    sel = routed_chunks(T // C, T, C, s["freeze"])
    n_seen = torch.tensor([T - 1 - (c + 1) * C for c in range(T // C)]).clamp(min=1).float()
    dd = d[:, sel]
    n_r, n_scored = dd.shape[1], s["n_scored"]
    y = (dd / n_seen[sel]).reshape(-1).numpy()
    print(f"{len(ids)} windows x {n_r} routed chunks; INT4 -> INT2 per chunk, nats per token that sees it x 1000: "
          f"mean {y.mean() * 1e3:.2f}, std {y.std() * 1e3:.2f}, min {y.min() * 1e3:.2f}, max {y.max() * 1e3:.2f}")
    print(f"all routed chunks INT2: {float(dd.sum(1).mean()) / n_scored:+.4f} nats per scored token over INT4")
    for frac in (0.25, 0.5, 0.75):
        k = round(frac * n_r)
        oracle = torch.sort(dd, 1).values[:, :k].sum(1).mean() / n_scored
        rand = dd.mean(1).mean() * k / n_scored
        print(f"INT2 for {frac:.0%} of the routed chunks: oracle {float(oracle):+.4f}, random {float(rand):+.4f} "
              f"nats per scored token over INT4")
    info = tokenizer_info(a.model)
    bos = info["bos"] if info["add_bos"] and info["bos"] >= 0 else None
    with open(a.calib, "rb") as f:
        w = windows_of(tokenize(a.model, f.read()), T, bos)[ids]
    x = LlamaModel(a.model, n_layer=0).embed(w).float()
    xh = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5)
    inputs = {"layer 0 input (version 1)": xh}
    layers = [int(v) for v in a.layers.split(",") if v]
    if layers:
        model = LlamaModel(a.model, n_layer=max(layers) + 1)
        with torch.no_grad():
            caps = [model.forward(w[i:i + 4], capture=True)[1] for i in range(0, len(w), 4)]
        for il in layers:
            q = torch.cat([c[il]["q"] for c in caps]).flatten(2)
            inputs[f"layer {il} queries"] = q
    fold = np.repeat(np.arange(len(ids)), n_r) % 4
    for name, feat in inputs.items():
        X = feat.reshape(len(ids), T // C, C, -1).mean(2)[:, sel].reshape(len(y), -1).numpy()
        ridge(name, X, y, fold)


def ridge(name, X, y, fold):
    for lam in (10.0, 100.0, 1000.0):
        pred = np.zeros_like(y)
        for f in range(4):
            tr = fold != f
            mu, ym = X[tr].mean(0), y[tr].mean()
            A = X[tr] - mu
            wgt = np.linalg.solve(A.T @ A + lam * np.eye(A.shape[1]), A.T @ (y[tr] - ym))
            pred[~tr] = (X[~tr] - mu) @ wgt + ym
        print(f"ridge {lam:g} on the chunk-mean of {name}: cross-validated correlation {np.corrcoef(pred, y)[0, 1]:.3f}")


if __name__ == "__main__":
    main()
