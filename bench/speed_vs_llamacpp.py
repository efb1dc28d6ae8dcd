#!/usr/bin/env python3
"""Prompt (ppN) and generation (tgN) speed of moqae (moqae-bench) and llama.cpp (llama-cpp-python's
low-level llama_decode, timed the way llama-bench times it: random token ids, the context filled to
the depth first, a warm-up run, median of the repetitions), side by side on the same model, threads
and depth. The two run alternately (ABAB...) in separate processes so that machine noise hits both.

  python bench/speed_vs_llamacpp.py -m MODEL [-t 2] [-p 512] [-n 128] [-d 0] [-r 5] [--rounds 2]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

KV_TYPES = {"f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 8}


def llamacpp_worker(args) -> None:
    """Runs in a child process: prints {"pp": [t/s...], "tg": [...]} as JSON."""
    import ctypes

    import llama_cpp

    n_tot = args.depth + max(args.prompt, args.gen)
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=n_tot, n_batch=512, n_ubatch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, flash_attn=True, type_k=KV_TYPES[args.kv],
                          type_v=KV_TYPES[args.kv], verbose=False)
    ctx = llm._ctx.ctx
    n_vocab = llm.n_vocab()
    x = 42
    toks = []
    for _ in range(n_tot):  # the same pseudo-random ids as moqae-bench
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        toks.append((x >> 33) % n_vocab)
    arr = (llama_cpp.llama_token * n_tot)(*toks)

    def decode(i0, n):
        for b0 in range(i0, i0 + n, 512):
            nb = min(512, i0 + n - b0)
            batch = llama_cpp.llama_batch_get_one(ctypes.cast(ctypes.byref(arr, 4 * b0),
                                                              ctypes.POINTER(llama_cpp.llama_token)), nb)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
        llama_cpp.llama_synchronize(ctx)

    def fill():
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        if args.depth:
            decode(0, args.depth)

    out = {}
    for test, n in (("pp", args.prompt), ("tg", args.gen)):
        if n == 0:
            continue
        res = []
        for r in range(-1, args.reps):
            fill()
            t0 = time.perf_counter()
            if test == "pp":
                decode(args.depth, n)
            else:
                for i in range(n):
                    decode(args.depth + i, 1)
            if r >= 0:
                res.append(n / (time.perf_counter() - t0))
        out[test] = res
    print(json.dumps(out))


def run_moqae(args) -> dict:
    exe = os.path.join(args.bin_dir, "moqae-bench")
    cmd = [exe, "-m", args.model, "-t", str(args.threads), "-p", str(args.prompt), "-n", str(args.gen),
           "-d", str(args.depth), "-r", str(args.reps), "--kv", args.moqae_kv]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = {}
    for line in out.splitlines():
        m = re.search(r"\| (pp|tg)\d+[^|]*\| ([0-9.]+) \(min", line)
        if m:
            res[m.group(1)] = float(m.group(2))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--prompt", type=int, default=512)
    ap.add_argument("-n", "--gen", type=int, default=128)
    ap.add_argument("-d", "--depth", type=int, default=0)
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of (moqae, llama.cpp)")
    ap.add_argument("--kv", choices=sorted(KV_TYPES), default="f16", help="llama.cpp's KV type")
    ap.add_argument("--moqae-kv", default="fp16")
    ap.add_argument("--bin-dir", default=os.environ.get("MOQAE_BIN_DIR", "build"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        llamacpp_worker(args)
        return 0
    ours = {"pp": [], "tg": []}
    theirs = {"pp": [], "tg": []}
    for _ in range(args.rounds):
        for k, v in run_moqae(args).items():
            ours[k].append(v)
        cmd = [sys.executable, __file__, "--worker"] + [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        for k, v in json.loads(out.strip().splitlines()[-1]).items():
            theirs[k].append(statistics.median(v))
    print(f"model {os.path.basename(args.model)}, threads {args.threads}, depth {args.depth}, "
          f"moqae kv {args.moqae_kv}, llama.cpp kv {args.kv} (flash attention), {args.rounds} rounds x {args.reps} reps")
    print("| test | moqae t/s | llama.cpp t/s | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for test, n in (("pp", args.prompt), ("tg", args.gen)):
        if not ours[test]:
            continue
        a, b = statistics.median(ours[test]), statistics.median(theirs[test])
        name = f"{test}{n}" + (f" @ d{args.depth}" if args.depth else "")
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
