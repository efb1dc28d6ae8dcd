"""tiny_vocab.py — small, deterministic tokenizer vocabularies for synthetic test models.

Both are trained on tests/data/wikitext-2-excerpt.txt (CC BY-SA 3.0, see tests/data/LICENSE-wikitext.md):
- SentencePiece BPE (`train_spm`, `add_spm_vocab`): the `sentencepiece` trainer, model_type=bpe,
  1000 pieces, byte_fallback, identity normalisation (LLaMA-2's settings), one thread, no shuffling.
  The trained .model file is the reference the C tokenizer is compared with.
- GPT-2 byte-level BPE (`add_bpe_vocab`): a plain BPE trainer written here (most frequent pair,
  ties to the smallest pair), 256 byte tokens + 400 merges + <|endoftext|>, <|im_start|>,
  <|im_end|> as control tokens. HF `tokenizers` with the same vocab and merges is its reference.
Used by models/make_tiny.py (vocabulary of the tiny GGUF models) and tests/test_tokenizer.py.
"""
from __future__ import annotations

import functools
import io
import re
from collections import Counter
from pathlib import Path

import gguf

ROOT = Path(__file__).resolve().parent.parent
EXCERPT = ROOT / "tests" / "data" / "wikitext-2-excerpt.txt"

SPM_VOCAB_SIZE = 1000
BPE_N_MERGES = 400
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _excerpt() -> str:
    return EXCERPT.read_text(encoding="utf-8")


# ---- SentencePiece ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def spm_model_bytes(split_by_whitespace: bool = True) -> bytes:
    """The serialized sentencepiece model (trained once per process; deterministic).
    split_by_whitespace=False lets pieces span words ("s▁of▁the"): a harder case for the C merges."""
    import sentencepiece as spm

    lines = [line for line in _excerpt().split("\n") if line.strip()]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        model_type="bpe",
        vocab_size=SPM_VOCAB_SIZE,
        byte_fallback=True,
        character_coverage=0.9995,  # the rarest characters are left to byte fallback
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=split_by_whitespace,
        max_sentence_length=1 << 16,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return out.getvalue()


def train_spm(out_dir: str | Path, split_by_whitespace: bool = True) -> Path:
    """Write the tiny sentencepiece model to out_dir/tiny-spm.model and return its path."""
    path = Path(out_dir) / ("tiny-spm.model" if split_by_whitespace else "tiny-spm-nosplit.model")
    path.write_bytes(spm_model_bytes(split_by_whitespace))
    return path


def add_spm_vocab(writer: gguf.GGUFWriter, split_by_whitespace: bool = True) -> int:
    """Write the tokenizer.ggml.* keys of the tiny SentencePiece vocabulary; returns n_vocab."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=spm_model_bytes(split_by_whitespace))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(sp.unk_id())
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    return len(tokens)


# ---- GPT-2 byte-level BPE --------------------------------------------------------------------


def gpt2_byte_chars() -> list[str]:
    """bytes_to_unicode() of GPT-2: the printable character standing for each byte."""
    direct = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in direct:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


# GPT-2's pre-tokenizer regex with Python's classes ([^\W\d_] = letters): close enough for training.
_WORD_RE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")


@functools.lru_cache(maxsize=1)
def train_bpe() -> tuple[list[str], list[str]]:
    """(tokens, merges) in the GPT-2 alphabet: 256 byte tokens, then one token per new merge result.
    Each step merges the most frequent adjacent pair (ties: the smallest pair), so it is deterministic."""
    byte_chars = gpt2_byte_chars()
    words: Counter = Counter()
    for w in _WORD_RE.findall(_excerpt()):
        words[tuple(byte_chars[b] for b in w.encode("utf-8"))] += 1
    tokens = list(byte_chars)
    known = set(tokens)
    merges: list[str] = []
    for _ in range(BPE_N_MERGES):
        pairs: Counter = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), _count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append(f"{a} {b}")
        if a + b not in known:
            tokens.append(a + b)
            known.add(a + b)
        merged: Counter = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return tokens, merges


def add_bpe_vocab(writer: gguf.GGUFWriter, pre: str = "gpt2") -> int:
    """Write the tokenizer.ggml.* keys of the tiny GPT-2 BPE vocabulary with pre-tokenizer `pre`
    ("gpt2", "smollm", "qwen2", "llama-bpe"); returns n_vocab. <|endoftext|> is BOS and EOS (not
    added by default); <|im_start|> and <|im_end|> are control tokens for chat-style tests."""
    tokens, merges = train_bpe()
    tokens = tokens + BPE_SPECIALS
    types = [gguf.TokenType.NORMAL] * (len(tokens) - len(BPE_SPECIALS)) + [gguf.TokenType.CONTROL] * len(BPE_SPECIALS)
    eot = tokens.index("<|endoftext|>")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eot)
    writer.add_eos_token_id(eot)
    writer.add_add_bos_token(False)
    return len(tokens)


def write_vocab_gguf(path: str | Path, kind: str, pre: str = "gpt2") -> int:
    """A GGUF holding only general.architecture = llama and a vocabulary (kind "spm", "spm-nosplit"
    or "bpe"): enough for the tokenizer, no tensors. Returns n_vocab."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if kind.startswith("spm"):
        n = add_spm_vocab(writer, split_by_whitespace=(kind == "spm"))
    else:
        n = add_bpe_vocab(writer, pre=pre)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return n
