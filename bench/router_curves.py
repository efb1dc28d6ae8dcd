"""router_curves.py — perplexity against KV bits for every kind of policy, same file and windows:
uniform codecs and sink variants (--kv), recency mixes (sink FP16, newest chunks INT4, oldest INT2:
--kv sink+int4 with a --kv-budget at the target bits, --kv-overflow demote and -b 32, so the ring demotes
the oldest chunks as each chunk of the window arrives), learned routers (--router),
learned routers combined with recency (--hybrid R@BITS: the router picks each new chunk's experts, the ring
demotes the oldest chunks to keep the budget of BITS per element per layer), routers with learned demotion
weights (--ordered R@BITS: the same, but the ring demotes single (chunk, layer) records by age x the layer's
weight, docs/ROUTER-FORMAT.md), optional llama.cpp KV types and
optional extra points from a JSON file (e.g. the attention-mass mixes of bench/attention_mass.py). Writes a
JSON of every point, prints a markdown table and draws an SVG plot (no plotting library needed).

  python bench/router_curves.py -m MODEL -f wiki.test.raw -c 2048 --chunks 16 \\
      --routers models/*.gguf --recency 4.0,3.5,3.0,2.5 [--hybrid R.gguf@3.0,R.gguf@3.5] \\
      [--llamacpp q8_0,q4_0] [--extra more.json] \\
      -o docs/curves-c2048.json --svg docs/curves-c2048.svg

Bits are the mean over windows of the cache at the end of each window (moqae-perplexity's "kv mean"
line): nominal (codes only) and effective (scales and zeros included).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXED = ["fp16", "int8", "int4", "int2", "sink+int4", "sink+int2"]
LLAMACPP_BITS = {"f16": 16.0, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0}


def run_ppl(args, extra: list) -> dict:
    cmd = [str(ROOT / "build" / "moqae-perplexity"), "-m", args.model, "-f", args.file, "-c", str(args.ctx),
           "-t", str(args.threads)] + (["--chunks", str(args.chunks)] if args.chunks else []) + extra
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    ppl = float(re.search(r"PPL = ([0-9.]+)", r.stdout).group(1))
    m = re.search(r"kv mean: +over (\d+) windows: ([0-9.]+) nominal / ([0-9.]+) effective bits; chunks fp16 ([0-9.]+)%"
                  r" int8 ([0-9.]+)% int4 ([0-9.]+)% int2 ([0-9.]+)%", r.stderr)
    return {"ppl": ppl, "windows": int(m.group(1)), "nominal_bits": float(m.group(2)),
            "effective_bits": float(m.group(3)),
            "experts_pct": dict(zip(("fp16", "int8", "int4", "int2"), map(float, m.groups()[3:]))),
            "command": " ".join(cmd[0:1] + [c if not c.startswith(str(ROOT)) else c[len(str(ROOT)) + 1:]
                                            for c in cmd[1:]])}


def run_llamacpp(args, kv: str) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "llamacpp_ppl.py"), "-m", args.model, "-f", args.file, "-c",
           str(args.ctx), "-t", str(args.threads), "--kv", kv] + (["--chunks", str(args.chunks)] if args.chunks else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    ppl = float(re.search(r"PPL = ([0-9.]+)", r.stdout + r.stderr).group(1))
    b = LLAMACPP_BITS[kv]
    return {"ppl": ppl, "nominal_bits": b, "effective_bits": b, "command": "python bench/llamacpp_ppl.py ..."}


def svg(points: list, path: Path, title: str, x_range: tuple | None = None) -> None:
    """PPL (log scale) against effective bits, one colour per kind; x_range (lo, hi): only points in it."""
    import math

    W, H, L, B, T, R = 720, 440, 70, 50, 30, 170
    if x_range:
        points = [p for p in points if x_range[0] <= p["effective_bits"] <= x_range[1]]
    xs = [p["effective_bits"] for p in points]
    ys = [math.log(p["ppl"]) for p in points]
    x0, x1 = (x_range[0], x_range[1]) if x_range else (0.0, max(xs) * 1.05)
    y0, y1 = min(ys) - 0.02, max(ys) + 0.02
    X = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    Y = lambda y: H - B - (y - y0) / (y1 - y0) * (H - B - T)  # noqa: E731
    colours = {"uniform": "#1f77b4", "sink": "#17becf", "recency": "#ff7f0e", "router": "#d62728",
               "router+recency": "#9467bd", "learned order": "#8c564b",
               "llama.cpp": "#7f7f7f", "attention-mass": "#2ca02c"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="18" font-size="14">{title}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">effective bits per KV element</text>',
           f'<text x="16" y="{(T + H - B) / 2}" transform="rotate(-90 16 {(T + H - B) / 2})" '
           f'text-anchor="middle">perplexity (log scale)</text>']
    step = 2 if x1 - x0 > 8 else 0.5
    for k in range(int((x1 - x0) / step) + 1):
        b = x0 + k * step
        out.append(f'<text x="{X(b)}" y="{H - B + 16}" text-anchor="middle">{b:g}</text>')
    for k in range(6):
        y = y0 + (y1 - y0) * k / 5
        out.append(f'<text x="{L - 6}" y="{Y(y) + 4}" text-anchor="end">{math.exp(y):.2f}</text>')
    for i, (kind, c) in enumerate(colours.items()):
        pts = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["effective_bits"])
        if not pts:
            continue
        if kind in ("recency", "router", "router+recency", "learned order", "attention-mass") and len(pts) > 1:
            d = " ".join(f"{X(p['effective_bits']):.1f},{Y(math.log(p['ppl'])):.1f}" for p in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="1.5"/>')
        for p in pts:
            out.append(f'<circle cx="{X(p["effective_bits"]):.1f}" cy="{Y(math.log(p["ppl"])):.1f}" r="4" fill="{c}">'
                       f'<title>{p["name"]}: PPL {p["ppl"]:.4f} at {p["effective_bits"]:.2f} bits</title></circle>')
        out.append(f'<circle cx="{W - R + 16}" cy="{T + 10 + 18 * i}" r="4" fill="{c}"/>'
                   f'<text x="{W - R + 26}" y="{T + 14 + 18 * i}">{kind}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", required=True)
    ap.add_argument("-c", "--ctx", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=0, help="windows (0: all)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--fixed", default=",".join(FIXED))
    ap.add_argument("--recency", default="", help="target effective bits of recency mixes, e.g. 4.0,3.5,3.0")
    ap.add_argument("--routers", nargs="*", default=[])
    ap.add_argument("--hybrid", default="", help="router and per-layer budget bits, e.g. r.gguf@3.0,r.gguf@3.5")
    ap.add_argument("--ordered", default="",
                    help="routers with demotion weights (train_router.py --demote-beta) and budget bits: the ring "
                         "demotes record by record in the learned order, e.g. r.gguf@3.5")
    ap.add_argument("--llamacpp", default="", help="llama.cpp KV types, e.g. q8_0,q4_0")
    ap.add_argument("--extra", default=None, help="JSON list of more points (name, kind, ppl, effective_bits, ...)")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--reuse", default=None, help="an earlier output JSON: its points (by name) are not run again")
    ap.add_argument("--svg", default=None)
    ap.add_argument("--svg-bits", default=None, help="effective-bits range of the plot, e.g. 2,5 (default: all)")
    a = ap.parse_args()

    points = []

    old = {p["name"]: p for p in json.loads(Path(a.reuse).read_text())["points"]} if a.reuse else {}

    def add(name, kind, run):
        try:
            res = dict(old[name]) if name in old else run()
        except RuntimeError as e:  # e.g. a budget below what the policy can reach: report it, go on
            print(f"{name}: {e}", file=sys.stderr, flush=True)
            return
        res.update(name=name, kind=kind)
        points.append(res)
        print(f"{name:40s} PPL {res['ppl']:9.4f}  nominal {res['nominal_bits']:6.3f}  effective "
              f"{res['effective_bits']:6.3f}", flush=True)

    for kv in filter(None, a.fixed.split(",")):
        add(kv, "sink" if kv.startswith("sink") else "uniform", lambda: run_ppl(a, ["--kv", kv]))
    def budgeted(b):
        # micro-batches of one chunk: the ring demotes as each chunk arrives, as in generation
        # --kv-bits b: a budget of ctx * elems * b / 8 bytes
        return ["--kv-overflow", "demote", "--kv-bits", str(b), "-b", "32"]

    for b in filter(None, a.recency.split(",")):
        add(f"recency@{b}", "recency", lambda: run_ppl(a, ["--kv", "sink+int4"] + budgeted(b)))
    for r in a.routers:
        add(Path(r).stem, "router", lambda: run_ppl(a, ["--router", r]))
    for h in filter(None, a.hybrid.split(",")):
        r, b = h.rsplit("@", 1)
        add(f"{Path(r).stem}+recency@{b}", "router+recency", lambda: run_ppl(a, ["--router", r] + budgeted(b)))
    for h in filter(None, a.ordered.split(",")):
        r, b = h.rsplit("@", 1)
        add(f"{Path(r).stem}+order@{b}", "learned order", lambda: run_ppl(a, ["--router", r] + budgeted(b)))
    for kv in filter(None, a.llamacpp.split(",")):
        add(f"llama.cpp {kv}", "llama.cpp", lambda: run_llamacpp(a, kv))
    if a.extra:
        for p in json.loads(Path(a.extra).read_text()):
            points.append(p)
    Path(a.out).write_text(json.dumps({"model": Path(a.model).name, "file": Path(a.file).name, "ctx": a.ctx,
                                       "chunks": a.chunks, "threads": a.threads, "points": points}, indent=1) + "\n")
    base = next((p["ppl"] for p in points if p["name"] == "fp16"), None)
    print("\n| policy | kind | PPL | vs fp16 | nominal bits | effective bits | fp16/int8/int4/int2 % |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for p in sorted(points, key=lambda p: -p["effective_bits"]):
        rel = f"{100 * (p['ppl'] / base - 1):+.2f}%" if base else ""
        mix = "/".join(f"{v:.0f}" for v in p["experts_pct"].values()) if "experts_pct" in p else ""
        print(f"| {p['name']} | {p['kind']} | {p['ppl']:.4f} | {rel} | {p['nominal_bits']:.3f} | "
              f"{p['effective_bits']:.3f} | {mix} |")
    if a.svg:
        svg(points, Path(a.svg), f"{Path(a.model).name}, {Path(a.file).name}, -c {a.ctx}"
            + (f", {a.chunks} windows" if a.chunks else ""),
            tuple(float(x) for x in a.svg_bits.split(",")) if a.svg_bits else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
