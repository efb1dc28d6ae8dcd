#!/usr/bin/env python3
"""Cost of the Python layer: generation tokens/s of moqae_cpp.Llama (create_completion, greedy)
against moqae-cli at equal settings (same model, prompt, threads, context, greedy, N tokens), run
alternately in separate processes so machine noise hits both. Prints the medians and the ratio.

  python bench/python_overhead.py -m MODEL [-t 2] [-n 128] [--rounds 5]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

PROMPT = "The history of the printing press begins"


def py_worker(args) -> None:
    import moqae_cpp

    llm = moqae_cpp.Llama(args.model, n_ctx=512, n_threads=args.threads, verbose=False)
    llm(PROMPT, max_tokens=4, temperature=0.0)  # warm-up
    # time generation only, as the CLI reports it: from the first sampled token (the prompt has been
    # evaluated by then) to the n-th, each step = decode one token + sample + detokenize the piece
    n, t0 = 0, 0.0
    for chunk in llm(PROMPT, max_tokens=args.n, temperature=0.0, stream=True):
        n += 1
        if n == 1:
            t0 = time.perf_counter()
    dt = time.perf_counter() - t0
    print(f"{(n - 1) / dt:.3f}")


def cli_run(args) -> float:
    exe = os.path.join(args.bin_dir, "moqae-cli")
    r = subprocess.run([exe, "-m", args.model, "-p", PROMPT, "-n", str(args.n), "--temp", "0", "-c", "512",
                        "-t", str(args.threads)], capture_output=True, text=True, check=True)
    m = re.search(r"generation: +(\d+) tokens in +([0-9.]+) s", r.stderr)
    return int(m.group(1)) / float(m.group(2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--bin-dir", default=os.environ.get("MOQAE_BIN_DIR", "build"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        py_worker(args)
        return 0
    cli, py = [], []
    for _ in range(args.rounds):
        cli.append(cli_run(args))
        out = subprocess.run([sys.executable, __file__, "--worker"] + sys.argv[1:], capture_output=True, text=True,
                             check=True).stdout
        py.append(float(out.strip().splitlines()[-1]))
    a, b = statistics.median(cli), statistics.median(py)
    print(f"generation, {args.n} tokens, {args.threads} threads, {args.rounds} alternating rounds")
    print(f"moqae-cli:        {a:.2f} tokens/s (runs: {', '.join(f'{x:.1f}' for x in cli)})")
    print(f"moqae_cpp.Llama:  {b:.2f} tokens/s (runs: {', '.join(f'{x:.1f}' for x in py)})")
    print(f"Python / C ratio: {b / a:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
