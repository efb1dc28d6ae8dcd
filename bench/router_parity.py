"""router_parity.py — issue 6, "Parity": the runtime (moqae_cpp, the C ring) and the PyTorch reference
(train/router.py) route the same windows with the same router; how many decisions agree.

Each window (moqae-perplexity's windows: -c tokens, the first replaced by BOS) is fed to the runtime one
chunk (32 tokens) at a time; after each piece the ring has completed exactly one more chunk, and the
change of moqae_kv_stats' per-expert record counts says how many of that chunk's layers took each
expert. The reference's assignment of the same chunk is counted the same way. A chunk agrees when the
counts are equal; records agree up to the smaller count per expert (for routers that decide once per
chunk, `--share all`, the counts are the decision itself; per layer they are its histogram over layers).

  python bench/router_parity.py -m MODEL -f wiki.test.raw -c 2048 --chunks 4 --router R.gguf
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "train"))

import moqae_cpp  # noqa: E402
from eval_ppl import window_assign  # noqa: E402
from reference import CODECS, LlamaModel, ppl_tokens, ppl_window  # noqa: E402
from router import load_router  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", required=True)
    ap.add_argument("-c", "--ctx-size", type=int, default=2048)
    ap.add_argument("--chunks", type=int, default=4, help="windows")
    ap.add_argument("--router", required=True)
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args(argv)
    n_ctx = a.ctx_size
    with open(a.file, "rb") as f:
        tokens, bos = ppl_tokens(a.model, f.read(), n_ctx, a.chunks)
    model = LlamaModel(a.model)
    router, _ = load_router(a.router, model)
    C = router.cfg.chunk
    llm = moqae_cpp.Llama(a.model, router_path=a.router, n_ctx=n_ctx, n_batch=C, n_threads=a.threads)
    n_chunk = same_chunk = rec_total = rec_same = 0
    for ci in range(a.chunks):
        win = ppl_window(tokens, n_ctx, ci, bos)
        asg, _ = window_assign(model, router, "fp16", win, C)
        llm.reset()
        before = llm.kv_cache_stats()["n_records"]
        for j in range(n_ctx // C):
            llm.eval(win[j * C:(j + 1) * C])
            after = llm.kv_cache_stats()["n_records"]
            rt = {k: after[k] - before[k] for k in CODECS}
            before = after
            ref = {k: 0 for k in CODECS}
            for c in asg[0, j].tolist():
                ref[CODECS[c]] += 1
            n_chunk += 1
            same_chunk += rt == ref
            rec_total += sum(ref.values())
            rec_same += sum(min(rt[k], ref[k]) for k in CODECS)
            if rt != ref:
                print(f"window {ci} chunk {j}: runtime {rt} reference {ref}", file=sys.stderr)
    llm.close()
    print(f"router {os.path.basename(a.router)}: {a.chunks} windows of {n_ctx}: chunks agreeing {same_chunk}/{n_chunk} "
          f"({100 * same_chunk / n_chunk:.2f}%), records agreeing {rec_same}/{rec_total} "
          f"({100 * rec_same / rec_total:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
