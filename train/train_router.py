"""train_router.py — train a MoQAE router (docs/ROUTER-FORMAT.md) for a llama GGUF on a calibration text,
with the model frozen: only the router's W1, W2, W3 learn. The forward is train/reference.py's, under
the attention rule, with the completed chunks' K/V a soft mixture of the experts' decoded K/V.

  python train/train_router.py -m MODEL.gguf --calib wiki.valid.raw --experts 16,4,2 --lambda 0.9 \
      --steps 150 --seq-len 512 --batch 2 --seed 0 -o router.gguf
  options: --chunk-size 32|64  --share all|G|none  --no-freeze  --hidden 32  --lr 0.01  --device cpu|cuda

The objective (docs/TRAINING.md has the reasoning), per batch of windows (seq-len tokens, BOS first if
the model adds one):
  p[b,g,c,j]  = mean over the tokens t of complete chunk c of softmax(router_g(x̂_t))_j
  q[b,g,c,j]  = p_j·(16/B_j) / Σ_k p_k·(16/B_k)            MoQAE's 1/B_j weighting: the mixture leans
                                                            toward the low-bit experts in proportion 16/B_j
  forward     : at the layers of group g, chunk c's K/V = K + Σ_j q_j·(dec_j(K) − K).detach()
                (straight-through: the quantisation noise is a constant, its weight q_j gets the gradient;
                 chunk 0 is FP16 unless --no-freeze)
  L_model     = mean NLL of every token that sees at least one completed chunk (positions >= C)
  L_mem       = mean over routed chunks (chunk 0 excluded when frozen; a last chunk no query sees, too)
                of Σ_g (layers of g / n_layer) Σ_j p_j·B_j/16
  L           = λ·L_model + (1−λ)·L_mem
A low-bit expert's noise enters the mixture 16/B_j times more strongly than its probability says, so the
NLL penalises low-bit choices where (and only where) their noise hurts the model; at a hard decision
(p one-hot) q = p and L_model is the deployed NLL. L_mem counts the plain probabilities: the expected
memory. Logged per step: both terms, the average bits of the hard decisions (the vote rule) on the batch,
and the expert histogram. Deterministic for a seed (and a thread count). After training, expected_bits
is measured on the whole calibration text with hard decisions (routed chunks, chunk 0 excluded when
frozen, layers weighted: the figure that sizes the ring beside the FP16 sink) and the router is written
by export_router.write_router.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

# Before torch is imported: OpenMP threads that sleep when idle instead of spinning. With active waiting
# (libgomp's default) every op of a 2-thread run stalls whenever another process holds a core: 6-10x
# slower on this shared 2-core machine (docs/TRAINING.md, "Cost").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_router import base_info, share_config, write_router  # noqa: E402
from reference import LlamaModel, SoftKV, codec_tool, tokenize, tokenizer_info  # noqa: E402
from router import BITS, Router, RouterConfig, parse_experts  # noqa: E402


@dataclasses.dataclass
class TrainConfig:
    model: str
    calib: str
    out: str | None = None
    chunk_size: int = 32
    experts: str = "16,4,2"
    lam: float = 0.9
    freeze: bool = True
    share: str = "all"
    steps: int = 100
    seq_len: int = 512
    batch: int = 2
    seed: int = 0
    device: str = "cpu"
    hidden: int = 32
    lr: float = 1e-2
    threads: int = 2
    act_quant: bool = True
    tokenizer: str | None = None
    log_every: int = 1
    codec: str | None = None  # 'torch' (kv_codec.py) or 'c' (build/kv-codec-dump); None: c when built
    pool: int = 0  # > 0: train on this many windows (a seeded choice) and cache their codec noise
    noise_cache: str | None = None  # with pool: a file that keeps the cache between runs (same model/pool/seed)
    objective: str = "mixture"  # 'mixture' (the soft mixture in the forward) or 'linear' (sensitivity.py)
    sens_cache: str | None = None  # linear: a file that keeps the measured sensitivities between runs
    demote_beta: float | None = None  # linear: write per-layer demotion weights (sensitivity.demote_weights)


def windows_of(tokens: list, T: int, bos) -> torch.Tensor:
    """[N][T] consecutive windows of the calibration tokens, the first token of each BOS if the model adds it."""
    n = len(tokens) // T
    if n < 1:
        raise ValueError(f"the calibration text has {len(tokens)} tokens, fewer than one window of {T}")
    w = torch.as_tensor(tokens[:n * T], dtype=torch.long).reshape(n, T)
    if bos is not None:
        w[:, 0] = bos
    return w


def layer_weights(cfg: RouterConfig) -> torch.Tensor:
    """[n_router]: the share of the layers each router decides for."""
    sizes = [min((g + 1) * cfg.group_size, cfg.n_layer) - g * cfg.group_size for g in range(cfg.n_router)]
    return torch.tensor(sizes, dtype=torch.float32) / cfg.n_layer


def routed_chunks(n_c: int, T: int, C: int, freeze: bool) -> slice:
    """Chunks whose expert matters: chunk 0 excluded when frozen, and the last chunk when no query sees it
    decoded (a query sees chunk c decoded when it lies in a later chunk, partial or not)."""
    n_seen = min(n_c, -(-T // C) - 1)
    return slice(1 if freeze else 0, n_seen)


def hard_bits(router: Router, x: torch.Tensor, T: int) -> tuple:
    """(average nominal bits, histogram {codec: decisions}) of the vote rule's decisions on x [B][T][n_embd]
    over the routed chunks (chunk 0 excluded when frozen), layers weighted."""
    cfg = router.cfg
    dec = router.decisions(x)  # [B][G][n_c]
    n_c = dec.shape[-1]
    sel = slice(1 if cfg.freeze else 0, n_c)
    d = dec[:, :, sel].cpu()
    bits = torch.tensor(cfg.bits, dtype=torch.float32)[d]  # [B][G][n]
    avg = float((bits.mean(dim=(0, 2)) * layer_weights(cfg)).sum()) if d.numel() else float("nan")
    hist = {c: int((d == j).sum()) for j, c in enumerate(cfg.experts)}
    return avg, hist


def train(tc: TrainConfig, log=print) -> tuple:
    """Train; returns (router, info dict with expected_bits, history). Writes tc.out when set."""
    torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    info = tokenizer_info(tc.model, tc.tokenizer)
    bos = info["bos"] if info["add_bos"] and info["bos"] >= 0 else None
    with open(tc.calib, "rb") as f:
        tokens = tokenize(tc.model, f.read(), tc.tokenizer)
    wins = windows_of(tokens, tc.seq_len, bos)
    model = LlamaModel(tc.model, device=tc.device, act_quant=tc.act_quant)
    hp = model.hp
    experts = parse_experts(tc.experts)
    rcfg = RouterConfig(n_embd=hp.n_embd, n_layer=hp.n_layer, experts=experts, chunk=tc.chunk_size, hidden=tc.hidden,
                        freeze=tc.freeze, norm_eps=hp.rms_eps, **share_config(tc.share, hp.n_layer))
    gen = torch.Generator().manual_seed(tc.seed)
    router = Router(rcfg, generator=gen).to(tc.device)
    opt = torch.optim.Adam(router.parameters(), lr=tc.lr)
    C, T = tc.chunk_size, tc.seq_len
    bits = torch.tensor(rcfg.bits, dtype=torch.float32, device=tc.device)
    penalty = 16.0 / bits
    lw = layer_weights(rcfg).to(tc.device)
    sel = routed_chunks(T // C, T, C, tc.freeze)
    codec = tc.codec or ("c" if os.access(codec_tool(), os.X_OK) else "torch")
    log(f"train_router: {len(tokens)} calibration tokens, {len(wins)} windows of {T}; experts {list(experts)}, "
        f"{rcfg.n_router} router(s) of {rcfg.group_size} layer(s), R {tc.hidden}, lambda {tc.lam}, "
        f"freeze {tc.freeze}, batch {tc.batch}, {tc.steps} steps, seed {tc.seed}, codec {codec}")
    ids = torch.arange(len(wins))
    if tc.objective == "linear":
        return train_linear(tc, log, model, wins, rcfg, router, opt, codec, t_start=time.time())
    cache = None
    if tc.pool > 0:  # a fixed pool of windows whose codec noise is computed once (docs/TRAINING.md)
        ids = torch.randperm(len(wins), generator=torch.Generator().manual_seed(tc.seed))[:tc.pool].sort().values
        cache = {}
        if tc.noise_cache and os.path.exists(tc.noise_cache):
            saved = torch.load(tc.noise_cache)
            if saved.get("key") == (os.path.basename(tc.model), tc.seq_len, tc.chunk_size, tuple(ids.tolist())):
                cache = saved["cache"]
                log(f"train_router: {len(cache)} cached noise records from {tc.noise_cache}")
        n_cached = len(cache)
    order = ids[torch.randperm(len(ids), generator=gen)]
    pos = 0
    history = []
    t_start = time.time()
    for step in range(1, tc.steps + 1):
        t0 = time.time()
        if pos + tc.batch > len(order):
            order, pos = ids[torch.randperm(len(ids), generator=gen)], 0
        batch_ids = order[pos:pos + tc.batch]
        tok = wins[batch_ids].to(tc.device)
        pos += tc.batch
        x = model.embed(tok)
        p = router.chunk_probs(x)  # [B][G][n_c][E]
        q = p * penalty
        q = q / q.sum(-1, keepdim=True)
        kv = SoftKV(chunk=C, weights=q, experts=experts, group_size=rcfg.group_size, frozen=tc.freeze, codec=codec,
                    cache=cache, window_ids=batch_ids.tolist())
        logits = model.forward(tok, kv=kv, logits_rows=slice(C, T - 1))
        l_model = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tok[:, C + 1:].reshape(-1))
        l_mem = ((p[:, :, sel] * bits / 16.0).sum(-1) * lw[None, :, None]).sum(1).mean()
        loss = tc.lam * l_model + (1.0 - tc.lam) * l_mem
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        avg, hist = hard_bits(router, x.detach(), T)
        rec = {"step": step, "l_model": l_model.item(), "l_mem": l_mem.item(), "loss": loss.item(), "bits": avg,
               "hist": hist, "s": time.time() - t0}
        history.append(rec)
        if step % tc.log_every == 0 or step == tc.steps:
            h = " ".join(f"{c} {n}" for c, n in hist.items())
            log(f"step {step:4d}  L {rec['loss']:.4f}  L_model {rec['l_model']:.4f}  L_mem {rec['l_mem']:.4f}  "
                f"bits {avg:.2f}  [{h}]  {rec['s']:.1f} s")
    if cache is not None and tc.noise_cache and len(cache) > n_cached:
        torch.save({"key": (os.path.basename(tc.model), tc.seq_len, tc.chunk_size, tuple(ids.tolist())),
                    "cache": cache}, tc.noise_cache)
        log(f"train_router: saved {len(cache)} noise records to {tc.noise_cache}")
    return finish(tc, log, model, wins, router, experts, history, t_start)


def finish(tc, log, model, wins, router, experts, history, t_start, demote_weight=None):
    """expected_bits over the whole calibration text, the export; (router, info)."""
    T = tc.seq_len
    eb, ehist, n = 0.0, {c: 0 for c in experts}, 0
    with torch.no_grad():
        for i in range(0, len(wins), 64):
            w = wins[i:i + 64]
            b, h = hard_bits(router, model.embed(w.to(tc.device)), T)
            eb, n = eb + b * len(w), n + len(w)
            ehist = {c: ehist[c] + h[c] for c in experts}
    eb /= n
    log(f"train_router: {time.time() - t_start:.0f} s; expected_bits {eb:.3f} on the calibration text "
        f"({' '.join(f'{c} {n}' for c, n in ehist.items())})")
    router = router.cpu()
    if tc.out:
        calib = "/".join(os.path.abspath(tc.calib).split(os.sep)[-2:])
        write_router(tc.out, router, base_info(model), tc.lam, eb, calibration=calib, demote_weight=demote_weight)
        log(f"train_router: wrote {tc.out}")
    return router, {"expected_bits": eb, "hist": ehist, "history": history}


def train_linear(tc, log, model, wins, rcfg, router, opt, codec, t_start):
    """The linear objective (docs/TRAINING.md): L_model is the NLL predicted from each pooled window's measured
    per-chunk sensitivities S (sensitivity.py), L_model = mean over windows of (NLL_ref + Σ_{g,c,j} q·S_g)
    / n_scored, with q the 1/B_j-weighted probabilities as in the mixture objective and S_g the sum of S over
    the layers of group g; L_mem as in the mixture objective. The model's forward runs only to measure S
    (two forwards and backwards per window); training steps then cost milliseconds."""
    from sensitivity import load_or_measure
    C, T = tc.chunk_size, tc.seq_len
    experts = rcfg.experts
    n_pool = tc.pool if tc.pool > 0 else min(32, len(wins))  # measuring costs ~20 s per window on 2 cores
    ids = torch.randperm(len(wins), generator=torch.Generator().manual_seed(tc.seed))[:n_pool].sort().values.tolist()
    key = (os.path.basename(tc.model), T, C, tuple(experts), tc.freeze, tuple(ids))
    sens = load_or_measure(tc.sens_cache, key, model, wins, ids, experts, C, tc.freeze, codec, log)
    S = sens["S"]  # [N][n_layer][n_c][E]
    G, gs = rcfg.n_router, rcfg.group_size
    Sg = torch.stack([S[:, g * gs:(g + 1) * gs].sum(1) for g in range(G)], 1).to(tc.device)  # [N][G][n_c][E]
    nll_ref = sens["nll"][:, 0].to(tc.device)  # at the first non-FP16 point
    ref_j = next(j for j, c in enumerate(experts) if c != "fp16")
    n_scored = sens["n_scored"]
    dS_all = Sg - Sg[..., ref_j:ref_j + 1]  # sensitivities relative to the reference point's expert
    x_all = model.embed(wins[ids].to(tc.device)).detach()
    bits = torch.tensor(rcfg.bits, dtype=torch.float32, device=tc.device)
    penalty = 16.0 / bits
    lw = layer_weights(rcfg).to(tc.device)
    sel = routed_chunks(T // C, T, C, tc.freeze)
    gen = torch.Generator().manual_seed(tc.seed + 1)
    history = []
    B = min(tc.batch, len(ids))
    for step in range(1, tc.steps + 1):
        t0 = time.time()
        b = torch.randperm(len(ids), generator=gen)[:B].to(tc.device)
        x = x_all[b]
        p = router.chunk_probs(x)  # [B][G][n_c][E]
        q = p * penalty
        q = q / q.sum(-1, keepdim=True)
        # predicted NLL: the measured NLL at the reference point, moved by the chunks' sensitivities
        # relative to that point's expert
        dS = dS_all[b]
        pred = nll_ref[b] + (q[:, :, sel] * dS[:, :, sel]).sum((1, 2, 3))
        l_model = (pred / n_scored).mean()
        l_mem = ((p[:, :, sel] * bits / 16.0).sum(-1) * lw[None, :, None]).sum(1).mean()
        loss = tc.lam * l_model + (1.0 - tc.lam) * l_mem
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % tc.log_every == 0 or step == tc.steps:
            with torch.no_grad():
                dec = router.decisions(x_all)  # [N][G][n_c] hard decisions on the whole pool
                hard = nll_ref + torch.gather(dS_all, -1, dec[..., None]).squeeze(-1)[:, :, sel].sum((1, 2))
            avg, hist = hard_bits(router, x_all, T)
            rec = {"step": step, "l_model": l_model.item(), "l_mem": l_mem.item(), "loss": loss.item(), "bits": avg,
                   "hist": hist, "pred_nll": float((hard / n_scored).mean()), "s": time.time() - t0}
            history.append(rec)
            h = " ".join(f"{c} {n}" for c, n in hist.items())
            log(f"step {step:4d}  L {rec['loss']:.4f}  L_model {rec['l_model']:.4f}  L_mem {rec['l_mem']:.4f}  "
                f"pool: bits {avg:.3f}  predicted NLL {rec['pred_nll']:.4f}  [{h}]")
    dw = None
    if tc.demote_beta is not None:
        from sensitivity import demote_weights, layer_costs
        costs = layer_costs(sens)
        dw = demote_weights(costs, tc.demote_beta)
        log("train_router: INT4 -> INT2 cost per layer (millinats per token that sees the chunk): "
            + " ".join(f"{1000 * float(c):.2f}" for c in costs))
        log(f"train_router: demotion weights (beta {tc.demote_beta}): " + " ".join(f"{w:.3f}" for w in dw))
    return finish(tc, log, model, wins, router, experts, history, t_start, demote_weight=dw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--calib", required=True, help="calibration text (never the evaluation text)")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--chunk-size", type=int, default=32, choices=(32, 64))
    ap.add_argument("--experts", default="16,4,2", help="bits or codec names, highest first: 16,8,4,2 ...")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.9, help="weight of L_model (1-λ: L_mem)")
    ap.add_argument("--no-freeze", action="store_true", help="route chunk 0 too (default: always FP16)")
    ap.add_argument("--share", default="all", help="all (one decision per chunk), G (per G layers), none (per layer)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2, help="windows per step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=32, help="R, the router MLP's width")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--no-act-quant", action="store_true", help="f32 activations (not the runtime's 8-bit ones)")
    ap.add_argument("--tokenizer", default=None, help="tokenize-dump (default: build/tokenize-dump)")
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument("--pool", type=int, default=0,
                    help="train on this many calibration windows (a seeded choice) and compute each one's codec noise "
                         "(mixture) or sensitivities (linear) once; 0: mixture all windows, linear 32")
    ap.add_argument("--noise-cache", default=None, help="with --pool: keep the noise in this file between runs")
    ap.add_argument("--objective", choices=("linear", "mixture"), default="linear",
                    help="linear: measured per-chunk sensitivities (sensitivity.py), fast steps; mixture: the soft "
                         "mixture of the experts' KV in every step's forward (docs/TRAINING.md)")
    ap.add_argument("--sens-cache", default=None, help="linear: keep the measured sensitivities in this file")
    ap.add_argument("--codec", choices=("torch", "c"), default=None,
                    help="who codes the chunks: c (build/kv-codec-dump, the runtime's encoder; the default when "
                         "built) or torch (train/kv_codec.py): the same bytes")
    ap.add_argument("--demote-beta", type=float, default=None,
                    help="linear: also write per-layer demotion weights (cost/mean)^-beta from the sensitivities, "
                         "the order in which --kv-overflow demote takes records one codec lower (0: recency, record by record; "
                         "negative: the reverse of the learned order, an ablation)")
    a = ap.parse_args(argv)
    if a.demote_beta is not None and (a.objective != "linear" or not -8.0 <= a.demote_beta <= 8.0):
        ap.error("--demote-beta needs --objective linear and a value in [-8, 8]")
    if not 0.0 <= a.lam <= 1.0:
        ap.error("--lambda must be in [0, 1]")
    tc = TrainConfig(model=a.model, calib=a.calib, out=a.out, chunk_size=a.chunk_size, experts=a.experts, lam=a.lam,
                     freeze=not a.no_freeze, share=a.share, steps=a.steps, seq_len=a.seq_len, batch=a.batch,
                     seed=a.seed, device=a.device, hidden=a.hidden, lr=a.lr, threads=a.threads,
                     act_quant=not a.no_act_quant, tokenizer=a.tokenizer, log_every=a.log_every, codec=a.codec,
                     pool=a.pool, noise_cache=a.noise_cache, objective=a.objective, sens_cache=a.sens_cache,
                     demote_beta=a.demote_beta)
    train(tc, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
