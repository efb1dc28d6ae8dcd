#!/usr/bin/env python3
"""Perplexity of a GGUF model measured with llama.cpp (through PyPI's llama-cpp-python), by the
method of llama.cpp's llama-perplexity: consecutive windows of n_ctx tokens, the KV cache cleared
before each, BOS replacing the first token if the model adds one, only the second half of each
window scored. Prints "[i]ppl," per window and "Final estimate: PPL = X +/- Y" like llama-perplexity.

Optionally saves the argmax token of every scored position (--save-argmax out.npy) so that
bench/agreement.py can compare moqae's next-token predictions with llama.cpp's.

  python bench/llamacpp_ppl.py -m MODEL -f wiki.test.raw -c 512 [--chunks 64] [--kv f16|q8_0|q4_0|q4_1]
"""
import argparse
import math
import sys
import time

import numpy as np

KV_TYPES = {"f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 8}  # ggml_type ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", required=True)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-b", "--batch", type=int, default=0)
    ap.add_argument("--kv", choices=sorted(KV_TYPES), default="f16")
    ap.add_argument("--no-flash-attn", action="store_true")
    ap.add_argument("--save-argmax", help="save the argmax ids of scored positions (int32 .npy)")
    args = ap.parse_args()

    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=args.model, n_ctx=args.ctx, n_batch=args.batch or args.ctx, n_ubatch=args.batch or args.ctx,
        n_threads=args.threads, n_threads_batch=args.threads, logits_all=True,
        flash_attn=not args.no_flash_attn, type_k=KV_TYPES[args.kv], type_v=KV_TYPES[args.kv], verbose=False)
    text = open(args.file, "rb").read()
    toks = llm.tokenize(text, add_bos=True, special=False)
    n_ctx = args.ctx
    n_max = len(toks) // n_ctx
    n_chunks = min(args.chunks, n_max) if args.chunks > 0 else n_max
    print(f"llama.cpp perplexity: {len(toks)} tokens, {n_chunks} windows of {n_ctx}, kv {args.kv}, "
          f"flash_attn {not args.no_flash_attn}", file=sys.stderr)
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    argmax = []
    t0 = time.time()
    for ci in range(n_chunks):
        win = list(toks[ci * n_ctx:(ci + 1) * n_ctx])
        if add_bos:
            win[0] = llm.token_bos()
        llm.reset()
        llm.eval(win)
        logits = np.asarray(llm.scores[first:n_ctx - 1], dtype=np.float64)
        targets = np.asarray(toks[ci * n_ctx + first + 1:(ci + 1) * n_ctx])
        mx = logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits - mx).sum(axis=1)) + mx[:, 0]
        v = lse - logits[np.arange(len(targets)), targets]
        nll += v.sum()
        nll2 += (v * v).sum()
        count += len(v)
        if args.save_argmax:
            argmax.append(logits.argmax(axis=1).astype(np.int32))
        print(f"[{ci + 1}]{math.exp(nll / count):.4f},", end="", flush=True)
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    err = ppl * math.sqrt(var / (count - 1)) if var > 0 else 0.0
    print(f"\nllama.cpp: {n_chunks} windows in {time.time() - t0:.1f} s", file=sys.stderr)
    print(f"Final estimate: PPL = {ppl:.4f} +/- {err:.5f}")
    if args.save_argmax:
        np.save(args.save_argmax, np.concatenate(argmax))
    return 0


if __name__ == "__main__":
    sys.exit(main())
