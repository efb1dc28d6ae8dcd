"""router_cost.py — what routing costs (issue 6: at most 2% of prefill time and 1% of decode time).

Runs moqae-bench with a router and with the fixed policy that stores the same codecs, alternating,
same threads: the router here is a full-size MLP whose every vote is INT4 (freezing off), so both
runs hold exactly the same chunks and the difference is the router's work (an embedding row per token,
the MLP of every router, the chunk vote). Prints tokens/s of both, the ratio per round and the median
overhead. With --router R.gguf it times that router instead against --kv int4 (then the chunk mix
differs too, which also changes attention time).

  python bench/router_cost.py -m MODEL [-t 2] [--rounds 5] [--share all|none] [--hidden 32]
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "train"))


def int4_router(model: str, path: str, share: str, hidden: int) -> None:
    """A router of the given shape whose every token votes INT4 (expert 1 of fp16,int4,int2)."""
    import torch
    from export_router import base_info, share_config
    from reference import LlamaModel
    from router import Router, RouterConfig

    m = LlamaModel(model, n_layer=0)
    cfg = RouterConfig(n_embd=m.hp.n_embd, n_layer=m.n_layer_full, hidden=hidden, freeze=False,
                       norm_eps=m.hp.rms_eps, **share_config(share, m.n_layer_full))
    r = Router(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # h_0 = silu(a) * a > 0 for a = x̂ . 1 != 0; w3 makes expert 1 win through h_0
        r.w1[:, 0, :] = 1.0
        r.w2[:, 0, :] = 1.0
        r.w3.zero_()
        r.w3[:, 1, 0] = 100.0
    from export_router import write_router

    write_router(path, r, base_info(m), 0.0, 4.0)


def bench(model: str, threads: int, extra: list) -> dict:
    cmd = [str(ROOT / "build" / "moqae-bench"), "-m", model, "-t", str(threads), "-p", "512", "-n", "128",
           "-r", "3"] + extra
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res = {}
    for line in out.splitlines():
        m = re.search(r"\| (pp512|tg128) \| ([0-9.]+)", line)
        if m:
            res[m.group(1)] = float(m.group(2))
    if len(res) != 2:
        raise RuntimeError(f"unexpected moqae-bench output:\n{out}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--share", default="all")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--router", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        router = a.router or str(Path(d) / "int4-router.gguf")
        if not a.router:
            int4_router(a.model, router, a.share, a.hidden)
        ratios = {"pp512": [], "tg128": []}
        for i in range(a.rounds):
            base = bench(a.model, a.threads, ["--kv", "int4"])
            routed = bench(a.model, a.threads, ["--router", router])
            for k in ratios:
                ratios[k].append(routed[k] / base[k])
            print(f"round {i + 1}: --kv int4 pp512 {base['pp512']:.1f} tg128 {base['tg128']:.1f} t/s | router "
                  f"pp512 {routed['pp512']:.1f} tg128 {routed['tg128']:.1f} t/s", flush=True)
    for k, v in ratios.items():
        med = statistics.median(v)
        print(f"{k}: router / int4 speed = {med:.4f} (median of {len(v)}; overhead {100 * (1 / med - 1):+.2f}% "
              f"of the time), rounds {', '.join(f'{x:.4f}' for x in v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
