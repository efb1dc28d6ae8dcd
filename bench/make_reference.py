#!/usr/bin/env python3
"""Writes tests/data/llamacpp-reference.json: figures computed with llama.cpp (PyPI llama-cpp-python,
flash attention, f16 KV) on SmolLM2-135M that the test suite compares moqae with, so the tests run
in CI without building llama.cpp:
  - greedy continuations of fixed prompts (64 tokens);
  - perplexity of tests/data/wikitext-2-test-head.txt at -c 128, first 16 windows.

  python bench/make_reference.py [-m MODEL]
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]


def perplexity(llm, text: bytes, n_ctx: int, n_chunks: int) -> float:
    toks = llm.tokenize(text, add_bos=True, special=False)
    first = n_ctx // 2
    nll, count = 0.0, 0
    for ci in range(min(n_chunks, len(toks) // n_ctx)):
        win = toks[ci * n_ctx:(ci + 1) * n_ctx]
        llm.reset()
        llm.eval(win)
        lg = np.asarray(llm.scores[first:n_ctx - 1], dtype=np.float64)
        tgt = np.asarray(win[first + 1:])
        mx = lg.max(axis=1)
        lse = np.log(np.exp(lg - mx[:, None]).sum(axis=1)) + mx
        nll += float((lse - lg[np.arange(len(tgt)), tgt]).sum())
        count += len(tgt)
    return math.exp(nll / count)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "models"))
    from fetch_model import smollm2_path

    import llama_cpp

    model = args.model or smollm2_path()
    out = {"llama_cpp_python": llama_cpp.__version__, "model_sha256_prefix": "b179c952",
           "command": "python bench/make_reference.py", "greedy_64": {}}
    llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_threads=2, flash_attn=True, verbose=False)
    for p in PROMPTS:
        toks = llm.tokenize(p.encode(), add_bos=True, special=True)
        llm.reset()
        gen = []
        for t in llm.generate(toks, temp=0.0, top_k=1, repeat_penalty=1.0):
            if llm.token_is_eog(t) if hasattr(llm, "token_is_eog") else t == llm.token_eos():
                break
            gen.append(t)
            if len(gen) == 64:
                break
        out["greedy_64"][p] = {"tokens": gen, "text": llm.detokenize(gen).decode("utf-8", "replace")}
    llm = llama_cpp.Llama(model_path=model, n_ctx=128, n_batch=128, n_threads=2, flash_attn=True, logits_all=True,
                          verbose=False)
    text = (ROOT / "tests/data/wikitext-2-test-head.txt").read_bytes()
    out["ppl_head_c128_chunks16"] = perplexity(llm, text, 128, 16)
    dst = ROOT / "tests/data/llamacpp-reference.json"
    dst.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(out, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
