"""sensitivity.py — per-chunk sensitivities of the model's NLL to each expert's KV codec, linearised: the
ground truth of train_router.py's linear objective (docs/TRAINING.md, "Objectives").

For a window of T tokens the training forward (reference.SoftKV, one group per layer) codes a completed
chunk c at layer l as K + Σ_j w[l,c,j]·noise_j(K) (straight-through: the noise is a constant). The
gradient of the window's summed NLL with respect to w[l,c,j] is g·noise_j: to first order, the change of
the NLL when chunk c at layer l is stored by expert j instead of FP16 (whose noise is 0). It is taken at
every "everywhere expert j" point (w one-hot at j for all chunks and layers, j over the non-FP16 experts)
and averaged: for two points that is the trapezoid rule along the path between them, exact for a
quadratic NLL. One forward and backward per point and window; the codec noise is computed once per
(window, layer, codec) and shared by the points.

    S[l, c, j]  (window, layer, chunk, expert; 0 for FP16 and for a frozen chunk 0)

  python train/sensitivity.py -m MODEL.gguf -f TEXT -c 512 --windows 16 -o sens.pt   # measure, save
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see train_router.py

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import LlamaModel, SoftKV, codec_tool, tokenize, tokenizer_info  # noqa: E402


def measure(model: LlamaModel, wins: torch.Tensor, ids, experts: tuple, C: int, freeze: bool, codec: str,
            log=print) -> dict:
    """{'ids': window ids, 'S': [N][n_layer][n_c][E] f32 (n_c = T // C), 'nll': [N][points] summed NLL at each
    point, 'n_scored': tokens scored per window (positions C .. T-2 predict the next token)}."""
    T = wins.shape[1]
    n_c, n_layer, E = T // C, model.hp.n_layer, len(experts)
    points = [j for j, c in enumerate(experts) if c != "fp16"]
    S = torch.zeros(len(ids), n_layer, n_c, E)
    nll = torch.zeros(len(ids), len(points))
    t0 = time.time()
    for n, wid in enumerate(ids):
        tok = wins[wid][None].to(model.device)
        cache = {}
        for pi, j0 in enumerate(points):
            w = torch.zeros(1, n_layer, n_c, E, device=model.device)
            w[..., j0] = 1.0
            w.requires_grad_(True)
            kv = SoftKV(chunk=C, weights=w, experts=experts, group_size=1, frozen=freeze, codec=codec, cache=cache,
                        window_ids=[int(wid)])
            logits = model.forward(tok, kv=kv, logits_rows=slice(C, T - 1))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tok[:, C + 1:].reshape(-1),
                                   reduction="sum")
            loss.backward()
            S[n] += w.grad[0].detach().cpu()
            nll[n, pi] = loss.item()
        S[n] /= len(points)
        log(f"sensitivity: window {wid} ({n + 1}/{len(ids)}): NLL/token at "
            + ", ".join(f"{experts[j]} {nll[n, i] / (T - 1 - C):.4f}" for i, j in enumerate(points))
            + f"; {time.time() - t0:.0f} s")
    return {"ids": [int(i) for i in ids], "S": S, "nll": nll, "n_scored": T - 1 - C, "experts": tuple(experts),
            "chunk": C, "seq_len": T, "freeze": freeze}


def layer_costs(sens: dict, lo: str = "int2", hi: str = "int4") -> torch.Tensor:
    """[n_layer] the NLL that storing a chunk at expert `lo` instead of `hi` adds, per layer, per scored token
    that sees the chunk (nats), pooled over the windows and the routed chunks: Σ (S[lo] − S[hi]) / Σ n_seen,
    n_seen(c) = the scored positions after chunk c (T − 1 − (c + 1)·C)."""
    S, ex, C, T = sens["S"], list(sens["experts"]), sens["chunk"], sens["seq_len"]
    d = S[..., ex.index(lo)] - S[..., ex.index(hi)]  # [N][L][n_c]
    n_c = d.shape[2]
    first = 1 if sens["freeze"] else 0
    seen = torch.tensor([max(T - 1 - (c + 1) * C, 0) for c in range(n_c)], dtype=torch.float64)
    seen[:first] = 0.0
    return (d[:, :, first:].double().sum((0, 2)) / (seen.sum() * d.shape[0])).float()


def demote_weights(costs: torch.Tensor, beta: float) -> list:
    """The runtime's per-layer demotion weights (kv-cache.h: the record with the largest age × weight goes one
    codec lower first) from layer_costs(): (cost / mean cost)^(−beta), costs floored at 5% of the mean. beta 0 is
    the recency order; the larger beta, the more the cheap layers are demoted before the dear ones. Capped at 1e6."""
    m = float(costs.clamp(min=0).mean())
    c = costs.clamp(min=0.05 * m) / m
    return [min(float(x), 1e6) for x in c.pow(-beta)]  # the format's range: (0, 1e6]


def load_or_measure(path: str | None, key: tuple, model, wins, ids, experts, C, freeze, codec, log=print) -> dict:
    """measure(), through the file path when it holds the same key (model, T, C, experts, freeze, window ids)."""
    if path and os.path.exists(path):
        saved = torch.load(path)
        if saved.get("key") == key:
            log(f"sensitivity: {len(saved['ids'])} windows from {path}")
            return saved
    res = measure(model, wins, ids, experts, C, freeze, codec, log)
    res["key"] = key
    if path:
        torch.save(res, path)
        log(f"sensitivity: saved to {path}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", required=True)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8, help="the first N windows")
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--experts", default="fp16,int4,int2")
    ap.add_argument("--no-freeze", action="store_true")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    info = tokenizer_info(a.model)
    bos = info["bos"] if info["add_bos"] and info["bos"] >= 0 else None
    with open(a.file, "rb") as f:
        tokens = tokenize(a.model, f.read())
    n = min(a.windows, len(tokens) // a.ctx)
    wins = torch.as_tensor(tokens[:n * a.ctx], dtype=torch.long).reshape(n, a.ctx)
    if bos is not None:
        wins[:, 0] = bos
    model = LlamaModel(a.model)
    codec = "c" if os.access(codec_tool(), os.X_OK) else "torch"
    res = measure(model, wins, list(range(n)), tuple(a.experts.split(",")), a.chunk_size, not a.no_freeze, codec,
                  log=lambda s: print(s, flush=True))
    res["tokens"] = wins
    torch.save(res, a.out)


if __name__ == "__main__":
    main()
