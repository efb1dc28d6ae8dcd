"""make_seeds.py — writes the committed fuzzing inputs under tests/fuzz/ (run it again to regenerate).

- vocab-spm, vocab-bpe: vocabulary-only GGUF files (models/tiny_vocab.py) that fuzz-tokenizer loads
  when $MOQAE_FUZZ_VOCAB is unset (the tiny SentencePiece and GPT-2 BPE vocabularies).
- corpus-gguf/: small valid GGUFs for fuzz-gguf: tiny models in several weight types and vocabularies
  (models/make_tiny.py, the byte vocabulary, the smallest legal shapes), the two vocabulary files, a file with one key
  of every metadata type, an empty one, a v2 header and an unusual alignment.
- corpus-router/: routers for fuzz-router, made for corpus-gguf/tiny-bytes-q4_0-tied (its default base model).
- corpus-tokenizer/: inputs for fuzz-tokenizer (byte 0 = flags, see fuzz-tokenizer.c): prose, code,
  chat markup, many scripts, emoji, invalid UTF-8, whitespace runs, byte-token look-alikes, token ids.
Every file is deterministic and a few KB, so the corpora stay small enough to commit. No file name ends
in .gguf (.gitignore leaves those out).
Usage: .venv/bin/python tests/fuzz/make_seeds.py [--vocab-only MODEL.gguf OUT]
  --vocab-only: write just MODEL's vocabulary (tokenizer.* keys) to OUT instead, e.g. SmolLM2's (2 MB)
  for a fuzz-tokenizer run on a machine that lacks the model.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import gguf
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "models"))

import tiny_vocab  # noqa: E402
from make_tiny import make_tiny  # noqa: E402


def _clean(d: Path) -> Path:
    d.mkdir(exist_ok=True)
    for f in d.iterdir():
        f.unlink()
    return d


def _writer_file(path: Path, fill, alignment: int | None = None) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _all_types(w: gguf.GGUFWriter) -> None:
    """One key of every metadata value type, plus a small tensor of each supported type."""
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4000000000)
    w.add_int32("t.i32", -2000000000)
    w.add_float32("t.f32", 1.5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", -2.25)
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_f32", [0.5, float("nan"), float("inf")])
    w.add_array("t.arr_str", ["a", "", "<|im_end|>"])
    w.add_array("t.arr_bool", [True, False])
    x = np.arange(64, dtype=np.float32).reshape(2, 32) / 7
    w.add_tensor("f32", x)
    w.add_tensor("f16", x.astype(np.float16))
    for name, qt in (("q8_0", gguf.GGMLQuantizationType.Q8_0), ("q4_0", gguf.GGMLQuantizationType.Q4_0),
                     ("q4_1", gguf.GGMLQuantizationType.Q4_1), ("bf16", gguf.GGMLQuantizationType.BF16)):
        w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)


def vocab_only(src: Path, dst: Path) -> None:
    """Copy general.architecture and the tokenizer.* keys of src into a GGUF without tensors."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            vtype = gguf.GGUFValueType(field.types[0])
            sub = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), vtype, sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_corpus(d: Path) -> None:
    small = dict(n_embd=32, n_layer=1, n_head=2, n_head_kv=1, n_ff=32, n_ctx=64)
    for vocab, wtype, tied in (("bytes", "q4_0", True), ("bytes", "q4_1", False), ("bytes", "q8_0", True),
                               ("bytes", "f16", True), ("bytes", "bf16", True)):
        make_tiny(d / f"tiny-{vocab}-{wtype}{'-tied' if tied else ''}", vocab=vocab, wtype=wtype, tied=tied,
                  **small)
    tiny_vocab.write_vocab_gguf(d / "vocab-spm", "spm")
    tiny_vocab.write_vocab_gguf(d / "vocab-bpe-smollm", "bpe", pre="smollm")
    _writer_file(d / "all-types", _all_types)
    _writer_file(d / "align-64", lambda w: w.add_tensor("x", np.ones((3, 5), np.float32)), alignment=64)
    _writer_file(d / "empty", lambda w: None)
    v2 = bytearray((d / "empty").read_bytes())
    struct.pack_into("<I", v2, 4, 2)
    (d / "empty-v2").write_bytes(bytes(v2))


TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    " leading space,  two spaces,\ttab\nnewline\r\nCRLF   trailing   ",
    "I'm you're he'll we've they'd SHE'S 'quoted' don't",
    "3.14159 1234567890 1,000,000 0x1F 2e-10 v1.2.3",
    "def f(x):\n    return x ** 2  # comment\n\nint main(void) { return 0; }\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<s> [INST] hi [/INST] </s><unk><|endoftext|><|im_start",
    "Ünïcödé café naïve — “quotes” ‘single’ … €100 ½ ©",
    "中文分词测试。日本語のテキスト。한국어 텍스트. Русский текст. العربية עברית हिन्दी ไทย",
    "😀👍🏽👨‍👩‍👧‍👦 🇫🇷 e\u0301 \u200d\u200b\ufeff",
    "▁already▁has▁sentencepiece▁spaces ▁ ▁▁",
    "<0x41><0xFF><0x0A> <0x>",
    "\n\n\n\n    \t\t  \r\r \x0b\x0c",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "",
]

RAW = [
    b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc\xed\xa0\x80\xf4\x90\x80\x80",  # invalid UTF-8
    b"\x00\x01\x02 nul and controls \x7f\x1b[31m",
    b"\xe2\x96",  # a cut "\xe2\x96\x81"
    bytes(range(256)),
]


def tokenizer_corpus(d: Path) -> None:
    n = 0
    for text in [t.encode() for t in TEXTS] + RAW:
        for flags in (0, 1 | 2 | 4):  # plain round trip; add_special + parse_special + render specials
            (d / f"text-{n:02d}-f{flags}").write_bytes(bytes([flags]) + text)
        n += 1
    ids = [0, 1, 2, 3, 100, 255, 256, 300, 500, 999, 5000, 49151]
    (d / "ids-valid").write_bytes(bytes([8 | 4]) + struct.pack(f"<{len(ids)}I", *ids))
    (d / "ids-invalid").write_bytes(bytes([8]) + struct.pack("<3I", 5, 0xFFFFFFFF, 0x80000000))


def router_corpus(d: Path, base: Path) -> None:
    """Routers for the tiny model `base` (the harness's default base model): shared, grouped and
    per-layer, two to four experts, chunk 32 and 64, frozen or not (train/export_router.py writes them)."""
    sys.path.insert(0, str(ROOT / "train"))
    import torch
    from export_router import write_router
    from reference import model_fingerprint
    from router import Router, RouterConfig

    r = gguf.GGUFReader(str(base))
    n_embd = int(r.fields["llama.embedding_length"].contents())
    n_layer = int(r.fields["llama.block_count"].contents())
    n_vocab = len(r.fields["tokenizer.ggml.tokens"].contents())
    info = {"architecture": "llama", "n_embd": n_embd, "n_layer": n_layer, "n_vocab": n_vocab,
            "fingerprint": model_fingerprint(str(base))}
    for i, (experts, chunk, share, freeze) in enumerate([
            (("fp16", "int4", "int2"), 32, "all", True), (("fp16", "int8", "int4", "int2"), 64, "none", False),
            (("int4", "int2"), 32, "all", False), (("fp16", "int2"), 32, "none", True),
            (("fp16", "int4", "int2"), 32, "all", True)]):
        cfg = RouterConfig(n_embd=n_embd, n_layer=n_layer, experts=experts, chunk=chunk, hidden=4, share=share,
                           freeze=freeze)
        router = Router(cfg, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            router.w3.mul_(400.0)  # confident, varied votes
        dw = [0.5 + 0.25 * l for l in range(n_layer)] if i == 4 else None  # demotion weights: router-4 only
        write_router(str(d / f"router-{i}"), router, info, 0.5, 4.0, calibration="seed", demote_weight=dw)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--vocab-only":
        vocab_only(Path(sys.argv[2]), Path(sys.argv[3]))
        return 0
    tiny_vocab.write_vocab_gguf(HERE / "vocab-spm", "spm")
    tiny_vocab.write_vocab_gguf(HERE / "vocab-bpe", "bpe")
    gguf_corpus(_clean(HERE / "corpus-gguf"))
    tokenizer_corpus(_clean(HERE / "corpus-tokenizer"))
    router_corpus(_clean(HERE / "corpus-router"), HERE / "corpus-gguf" / "tiny-bytes-q4_0-tied")
    total = sum(f.stat().st_size for f in HERE.rglob("*") if f.is_file() and f.suffix not in (".c", ".py"))
    print(f"tests/fuzz: {total / 1024:.0f} KiB of seeds and vocabularies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
