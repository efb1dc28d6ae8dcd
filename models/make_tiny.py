"""make_tiny.py — write tiny synthetic llama GGUF models for unit tests (deterministic for a seed).

`python models/make_tiny.py -o tiny.gguf [--vocab bpe|spm|bytes] [--wtype f32|f16|bf16|q8_0|q4_0|q4_1]
 [--n-embd 64 --n-layer 2 --n-head 4 --n-head-kv 2 --n-ff 128 --n-ctx 256] [--tied] [--seed 0]`
or `from make_tiny import make_tiny; make_tiny(path, wtype="q4_0", tied=True)`.
Keys, tensor names and shapes follow llama.cpp's llama models (checked against SmolLM2-135M's GGUF);
norms are F32, other weights random normal scaled by 1/sqrt(fan_in) so logits are non-trivial, then
stored in --wtype with gguf.quants. The vocabulary comes from models/tiny_vocab.py (bpe, spm);
`bytes` is a small built-in GPT-2-style byte vocabulary. It does not write routers (train/ does).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

import gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_vocab  # noqa: E402  (models/tiny_vocab.py: the bpe and spm test vocabularies)

WTYPES: dict[str, gguf.GGMLQuantizationType] = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
}

FILE_TYPES: dict[str, gguf.LlamaFileType] = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
}

VOCABS = ("bpe", "spm", "bytes")


@dataclasses.dataclass
class TinyConfig:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx: int = 256
    vocab: str = "bpe"  # bpe | spm | bytes
    pre: str = "gpt2"  # tokenizer.ggml.pre of the bpe vocabulary
    wtype: str = "f32"  # storage type of the 2-D weights (norms are always F32)
    tied: bool = False  # no output.weight: the output projection reuses token_embd.weight
    seed: int = 0
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5
    n_vocab: int = 0  # filled in by make_tiny from the vocabulary

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def check(self) -> None:
        if self.vocab not in VOCABS:
            raise ValueError(f"vocab must be one of {VOCABS}, got {self.vocab!r}")
        if self.wtype not in WTYPES:
            raise ValueError(f"wtype must be one of {tuple(WTYPES)}, got {self.wtype!r}")
        for name in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_ctx"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_head_kv ({self.n_head_kv})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        block = gguf.GGML_QUANT_SIZES[WTYPES[self.wtype]][0]
        for name in ("n_embd", "n_ff"):  # the row lengths (ne[0]) of the 2-D weights
            if getattr(self, name) % block:
                raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of {block} for {self.wtype}")


# ---- vocabularies ------------------------------------------------------------------------------


def add_bytes_vocab(writer: gguf.GGUFWriter) -> int:
    """A tiny GPT-2-style vocabulary: the 256 byte tokens, four merges and <|endoftext|> (BOS/EOS).
    Used when models/tiny_vocab.py is not wanted; the real test vocabularies live there."""
    byte_tokens = tiny_vocab.gpt2_byte_chars()
    merges = ["Ġ t", "h e", "i n", "Ġt he"]  # gguf-py cannot write an empty array
    merged = ["Ġt", "he", "in", "Ġthe"]
    tokens = byte_tokens + merged + ["<|endoftext|>"]
    types = [gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_add_bos_token(False)
    return len(tokens)


def _add_vocab(writer: gguf.GGUFWriter, cfg: TinyConfig) -> int:
    if cfg.vocab == "bytes":
        return add_bytes_vocab(writer)
    if cfg.vocab == "bpe":
        return int(tiny_vocab.add_bpe_vocab(writer, pre=cfg.pre))
    return int(tiny_vocab.add_spm_vocab(writer))


# ---- weights -----------------------------------------------------------------------------------


def _tensors(cfg: TinyConfig, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """(name, float32 array) in file order. numpy shape is (rows, cols) = ggml ne reversed, e.g.
    attn_k (n_head_kv*head_dim, n_embd) is ne [n_embd, n_head_kv*head_dim] as in SmolLM2's GGUF."""
    e, f, v, kv = cfg.n_embd, cfg.n_ff, cfg.n_vocab, cfg.n_head_kv * cfg.head_dim

    def w(rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(gain / np.sqrt(cols)))

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(e, dtype=np.float32)).astype(np.float32)

    # token_embd gain 2: with RMS-normed inputs the (tied) logits then have a std of about 2
    out = [("token_embd.weight", w(v, e, 2.0))]
    for i in range(cfg.n_layer):
        out += [
            (f"blk.{i}.attn_norm.weight", norm()),
            (f"blk.{i}.attn_q.weight", w(e, e)),
            (f"blk.{i}.attn_k.weight", w(kv, e)),
            (f"blk.{i}.attn_v.weight", w(kv, e)),
            (f"blk.{i}.attn_output.weight", w(e, e, 0.5)),
            (f"blk.{i}.ffn_norm.weight", norm()),
            (f"blk.{i}.ffn_gate.weight", w(f, e)),
            (f"blk.{i}.ffn_up.weight", w(f, e)),
            (f"blk.{i}.ffn_down.weight", w(e, f, 0.5)),
        ]
    out.append(("output_norm.weight", norm()))
    if not cfg.tied:
        out.append(("output.weight", w(v, e, 2.0)))
    return out


def _add_tensor(writer: gguf.GGUFWriter, name: str, x: np.ndarray, wtype: str) -> None:
    qtype = WTYPES[wtype]
    if x.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, x.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, x.astype(np.float16))
    else:  # bf16 and the block types come back as raw bytes, (rows, bytes per row)
        writer.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)


# ---- the file ----------------------------------------------------------------------------------


def make_tiny(path: str | os.PathLike[str], **opts) -> TinyConfig:
    """Write a tiny llama GGUF to path (atomically) and return its config, n_vocab filled in.
    opts are TinyConfig fields: n_embd, n_layer, n_head, n_head_kv, n_ff, n_ctx, vocab, pre, wtype,
    tied, seed, rope_freq_base, rms_eps."""
    cfg = TinyConfig(**opts)
    cfg.check()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="llama")
    try:
        writer.add_name(f"moqae-tiny-{cfg.vocab}-{cfg.wtype}{'-tied' if cfg.tied else ''}-seed{cfg.seed}")
        writer.add_file_type(int(FILE_TYPES[cfg.wtype]))
        if cfg.wtype not in ("f32", "f16", "bf16"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        cfg.n_vocab = _add_vocab(writer, cfg)
        writer.add_vocab_size(cfg.n_vocab)
        writer.add_context_length(cfg.n_ctx)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_feed_forward_length(cfg.n_ff)
        writer.add_head_count(cfg.n_head)
        writer.add_head_count_kv(cfg.n_head_kv)
        writer.add_rope_freq_base(cfg.rope_freq_base)
        writer.add_layer_norm_rms_eps(cfg.rms_eps)
        writer.add_rope_dimension_count(cfg.head_dim)

        rng = np.random.default_rng(cfg.seed)
        for name, x in _tensors(cfg, rng):
            _add_tensor(writer, name, x, cfg.wtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write a tiny random llama GGUF for tests.")
    d = TinyConfig()
    ap.add_argument("-o", "--output", required=True, help="output .gguf path")
    ap.add_argument("--vocab", choices=VOCABS, default=d.vocab)
    ap.add_argument("--pre", default=d.pre, help="tokenizer.ggml.pre of the bpe vocabulary")
    ap.add_argument("--wtype", choices=tuple(WTYPES), default=d.wtype)
    for name in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_ctx", "seed"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    ap.add_argument("--rope-freq-base", type=float, default=d.rope_freq_base)
    ap.add_argument("--rms-eps", type=float, default=d.rms_eps)
    ap.add_argument("--tied", action="store_true", help="no output.weight (reuse token_embd.weight)")
    a = ap.parse_args(argv)
    try:
        cfg = make_tiny(a.output, n_embd=a.n_embd, n_layer=a.n_layer, n_head=a.n_head, n_head_kv=a.n_head_kv,
                        n_ff=a.n_ff, n_ctx=a.n_ctx, vocab=a.vocab, pre=a.pre, wtype=a.wtype, tied=a.tied,
                        seed=a.seed, rope_freq_base=a.rope_freq_base, rms_eps=a.rms_eps)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"make_tiny: error: {e}", file=sys.stderr)
        return 1
    print(f"{a.output}: llama n_vocab={cfg.n_vocab} n_embd={cfg.n_embd} n_layer={cfg.n_layer} n_head={cfg.n_head} "
          f"n_head_kv={cfg.n_head_kv} n_ff={cfg.n_ff} wtype={cfg.wtype}{' tied' if cfg.tied else ''}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
