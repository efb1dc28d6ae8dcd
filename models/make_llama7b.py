"""make_llama7b.py — write a LLaMA-2-7B-shaped GGUF with random Q4_0 weights, for speed and memory
benchmarks at 32k-128k context (issue 7): 32 layers, n_embd 4096, 32 heads (no GQA), n_ff 11008,
vocab 32000 (SentencePiece-style: <unk> <s> </s>, 256 byte tokens, then word pieces), rope base
10000, context 131072. Weights are random Q4_0 blocks written directly (random nibbles, an f16 scale
of about 1/(4.6*sqrt(fan_in)) so activations stay in range), not quantized from floats: the file
(3.8 GB) is written in under a minute with numpy. Norms are F32 near 1. The numbers it produces are
meaningless; its shape, byte counts and memory traffic are those of LLaMA-2-7B Q4_0 (3.72 GB of
weights read per token).

    python models/make_llama7b.py -o /tmp/llama7b-q4_0.gguf [--n-layer 32] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

import gguf

N_EMBD, N_HEAD, N_FF, N_VOCAB, N_CTX = 4096, 32, 11008, 32000, 131072
QK = 32  # Q4_0 block: f16 d, 16 bytes of nibbles (ggml's block_q4_0)


def q4_0_random(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """rows x (cols/32) random Q4_0 blocks as bytes, shape (rows, cols/32*18)."""
    nb = cols // QK
    blocks = np.frombuffer(rng.bytes(rows * nb * 18), dtype=np.uint8).reshape(rows, nb, 18).copy()
    d = (rng.uniform(0.75, 1.25, size=(rows, nb)) / (4.6 * np.sqrt(cols))).astype(np.float16)
    blocks[:, :, 0:2] = d.view(np.uint8).reshape(rows, nb, 2)
    return blocks.reshape(rows, nb * 18)


def spm_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary of n pieces: specials, byte fallback, then word pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    singles = list(alphabet + alphabet.upper() + "0123456789.,;:!?'\"()-")
    seen = set(tokens)
    for s in singles + ["\u2581" + c for c in singles]:
        if s not in seen:
            tokens.append(s), types.append(1), seen.add(s)
    rng = np.random.default_rng(1234)
    while len(tokens) < n:
        k = int(rng.integers(2, 8))
        s = "\u2581" * int(rng.integers(0, 2)) + "".join(alphabet[i] for i in rng.integers(0, 26, size=k))
        if s not in seen:
            tokens.append(s), types.append(1), seen.add(s)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(n - 259)]
    return tokens[:n], scores[:n], types[:n]


def make(path: str, n_layer: int = 32, seed: int = 0) -> None:
    t0 = time.time()
    rng = np.random.default_rng(seed)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(tmp), arch="llama")
    q40 = gguf.GGMLQuantizationType.Q4_0
    w.add_name(f"llama2-7b-shaped-random-q4_0-{n_layer}l")
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_0))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, scores, types = spm_vocab(N_VOCAB)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_vocab_size(N_VOCAB)
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)

    def norm() -> np.ndarray:
        return (1.0 + 0.05 * rng.standard_normal(N_EMBD)).astype(np.float32)

    w.add_tensor("token_embd.weight", q4_0_random(rng, N_VOCAB, N_EMBD), raw_dtype=q40)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        for name, rows, cols in (("attn_q", N_EMBD, N_EMBD), ("attn_k", N_EMBD, N_EMBD), ("attn_v", N_EMBD, N_EMBD),
                                 ("attn_output", N_EMBD, N_EMBD), ("ffn_gate", N_FF, N_EMBD),
                                 ("ffn_up", N_FF, N_EMBD), ("ffn_down", N_EMBD, N_FF)):
            w.add_tensor(f"blk.{i}.{name}.weight", q4_0_random(rng, rows, cols), raw_dtype=q40)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
    w.add_tensor("output_norm.weight", norm())
    w.add_tensor("output.weight", q4_0_random(rng, N_VOCAB, N_EMBD), raw_dtype=q40)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {n_layer} layers) in {time.time() - t0:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--n-layer", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    make(a.output, a.n_layer, a.seed)


if __name__ == "__main__":
    main()
