#!/usr/bin/env python3
"""Teacher-forced next-token agreement between moqae and llama.cpp: for the first K windows of
-c tokens of a text (the perplexity windows), the argmax of moqae's logits at every scored position
(the second half of each window) is compared with llama.cpp's (saved by
`bench/llamacpp_ppl.py --save-argmax`). Prints the agreement and the positions compared.

  python bench/llamacpp_ppl.py -m MODEL -f wiki.test.raw -c 512 --chunks 64 --save-argmax ref.npy
  python bench/agreement.py -m MODEL -f wiki.test.raw -c 512 --chunks 64 --ref ref.npy
"""
import argparse
import sys

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", required=True)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--ref", required=True, help="llama.cpp's argmax ids (.npy)")
    args = ap.parse_args()
    import moqae_cpp

    ref = np.load(args.ref)
    text = open(args.file, "rb").read()
    n_ctx, first = args.ctx, args.ctx // 2
    ours = []
    with moqae_cpp.Llama(args.model, n_ctx=n_ctx, n_batch=n_ctx, n_threads=args.threads, logits_all=True) as llm:
        toks = llm.tokenize(text, add_bos=True, special=False)
        add_bos = len(llm.tokenize(b"", add_bos=True)) > 0  # the model adds BOS (llama.cpp's window rule)
        for ci in range(args.chunks):
            win = list(toks[ci * n_ctx:(ci + 1) * n_ctx])
            if add_bos:
                win[0] = llm.token_bos()
            llm.reset()
            llm.eval(win)
            ours.append(np.asarray(llm.scores[first:n_ctx - 1]).argmax(axis=1))
    ours = np.concatenate(ours)
    n = min(len(ours), len(ref))
    agree = float((ours[:n] == ref[:n]).mean())
    print(f"teacher-forced argmax agreement with llama.cpp: {agree * 100:.2f}% of {n} positions "
          f"({args.chunks} windows of {n_ctx}, second halves)")
    return 0 if agree >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
