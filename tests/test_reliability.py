"""test_reliability.py — the rows of the bad-input matrix (docs/BAD-INPUT.md) that
tests/test_bad_input.py and tests/test_cli.py do not already check: malformed GGUF header fields,
metadata and tensor infos (patched copies of a tiny model), absurd context sizes, context overflow,
Ctrl-C during the prompt and during generation, bad prompt files, bad numeric options, injected
allocation failures and Ctrl-C at exact points (tests/fuzz/inject.c, an LD_PRELOAD shim compiled here
with cc), the KV overflow policies, and concurrent contexts on one model (through the moqae_cpp
package). Every failure must be an exit status of 1 with "error: ..." naming the problem, never a signal
or a sanitizer report. Tools come from $MOQAE_BIN_DIR (default build/); the SmolLM2 rows use the cached
model (models/fetch_model.py).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import CRASH_MARKERS, ROOT, clean_failure, no_crash, run_tool

sys.path.insert(0, str(ROOT / "models"))

import make_bad  # noqa: E402
from make_tiny import make_tiny  # noqa: E402

HEAD = ROOT / "tests/data/wikitext-2-test-head.txt"
INJECT_SRC = ROOT / "tests/fuzz/inject.c"
# what an allocation failure may say: ours, strerror(ENOMEM) from fopen, pthread_create's failure
OOM_MESSAGE = r"^error: .*(out of memory|cannot allocate memory|could not start worker thread)"


# ---- helpers -------------------------------------------------------------------------------------


def cli(bin_dir: Path, model, *args, **kw) -> subprocess.CompletedProcess:
    return run_tool([bin_dir / "moqae-cli", "-m", model, *args], timeout=kw.pop("timeout", 120), **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reliability") / "tiny.gguf"
    make_tiny(path, vocab="bpe", wtype="q4_0")
    return path


# ---- malformed GGUF fields (rows beyond tests/test_bad_input.py) --------------------------------


def _value_pos(lay: make_bad.Layout, key: str) -> int:
    """File offset of a metadata value's u32 type; the value itself follows it."""
    return lay.keys[key] + len(key.encode())


def _name_span(lay: make_bad.Layout, name: str) -> slice:
    t = lay.tensors[name]
    end = t.ne_pos[0] - 4  # the name is followed by n_dims (u32), then ne[]
    return slice(end - len(name.encode()), end)


# name -> (patch(buf, layout), expected message). Offsets in the header: version u32 at 4, n_tensors
# u64 at 8, n_kv u64 at 16, the first key's length u64 at 24 (GGUF v3, ggml docs/gguf.md).
PATCHES = {
    "version_0": (lambda b, L: struct.pack_into("<I", b, 4, 0), r"unsupported GGUF version 0"),
    "version_1": (lambda b, L: struct.pack_into("<I", b, 4, 1), r"version 1 is not supported"),
    "version_4": (lambda b, L: struct.pack_into("<I", b, 4, 4), r"unsupported GGUF version 4"),
    "n_tensors_huge": (lambda b, L: struct.pack_into("<Q", b, 8, 1 << 62), r"declares \d+ tensors"),
    "n_tensors_plus_one": (lambda b, L: struct.pack_into("<Q", b, 8, len(L.tensors) + 1), r"past the end"),
    "n_kv_huge": (lambda b, L: struct.pack_into("<Q", b, 16, 1 << 62), r"declares \d+ metadata entries"),
    "n_kv_plus_one": (lambda b, L: struct.pack_into("<Q", b, 16, len(L.keys) + 1), r"past the end"),
    "key_length_huge": (lambda b, L: struct.pack_into("<Q", b, 24, 1 << 63), r"string length \d+ .*past the end"),
    "value_type_13": (lambda b, L: struct.pack_into("<I", b, _value_pos(L, "general.architecture"), 13),
                      r"value type 13 is not a GGUF value type"),
    "string_length_huge": (lambda b, L: struct.pack_into("<Q", b, _value_pos(L, "general.architecture") + 4, 1 << 62),
                           r"'general.architecture' value: string length \d+ .*past the end"),
    "array_count_huge": (lambda b, L: struct.pack_into("<Q", b, _value_pos(L, "tokenizer.ggml.tokens") + 8, 1 << 61),
                         r"array of \d+ string .*past the end"),
    "array_elem_type_99": (lambda b, L: struct.pack_into("<I", b, _value_pos(L, "tokenizer.ggml.tokens") + 4, 99),
                           r"array element type 99"),
    "nested_array": (lambda b, L: struct.pack_into("<I", b, _value_pos(L, "tokenizer.ggml.tokens") + 4, 9),
                     r"nested arrays"),
    "n_dims_5": (lambda b, L: struct.pack_into("<I", b, L.tensors["output_norm.weight"].ne_pos[0] - 4, 5),
                 r"n_dims = 5"),
    "dim_zero": (lambda b, L: struct.pack_into("<Q", b, L.tensors["output_norm.weight"].ne_pos[0], 0),
                 r"ne\[0\] = 0"),
    "offset_misaligned": (lambda b, L: struct.pack_into("<Q", b, L.tensors["output_norm.weight"].offset_pos,
                                                        L.tensors["output_norm.weight"].offset + 4),
                          r"not a multiple of the alignment"),
    "duplicate_tensor": (lambda b, L: b.__setitem__(_name_span(L, "blk.0.attn_v.weight"), b"blk.0.attn_k.weight"),
                         r"duplicate tensor name"),
    "wrong_shape": (lambda b, L: struct.pack_into("<Q", b, L.tensors["output_norm.weight"].ne_pos[0], 32),
                    r"has shape \[32.*expected \[64"),
    "context_length_0": (lambda b, L: struct.pack_into("<I", b, _value_pos(L, "llama.context_length") + 4, 0),
                         r"context_length' = 0 is outside"),
    "context_length_2^32-1": (lambda b, L: struct.pack_into("<I", b, _value_pos(L, "llama.context_length") + 4,
                                                            0xFFFFFFFF), r"context_length' = 4294967295 is outside"),
    "head_count_3": (lambda b, L: struct.pack_into("<I", b, _value_pos(L, "llama.attention.head_count") + 4, 3),
                     r"not a multiple of head_count 3"),
    "rms_eps_nan": (lambda b, L: struct.pack_into("<f", b, _value_pos(L, "llama.attention.layer_norm_rms_epsilon") + 4,
                                                  float("nan")), r"must be a positive finite number"),
    "vocab_size_mismatch": (lambda b, L: struct.pack_into("<I", b, _value_pos(L, "llama.vocab_size") + 4, 1000),
                            r"vocab_size = 1000 but the vocabulary has"),
    "tokenizer_model_unknown": (lambda b, L: b.__setitem__(slice(_value_pos(L, "tokenizer.ggml.model") + 12,
                                                                 _value_pos(L, "tokenizer.ggml.model") + 16), b"zzzz"),
                                r"tokenizer.ggml.model 'zzzz' is not supported"),
}


@pytest.mark.parametrize("name", list(PATCHES))
def test_malformed_field(name, tiny, tmp_path, bin_dir):
    patch, pattern = PATCHES[name]
    buf = bytearray(tiny.read_bytes())
    patch(buf, make_bad.layout(bytes(buf)))
    bad = tmp_path / f"{name}.gguf"
    bad.write_bytes(bytes(buf))
    clean_failure(cli(bin_dir, bad, "-p", "hi", "-n", "1"), pattern)


@pytest.mark.parametrize("value,pattern", [(0, r"alignment = 0 is not a power of two"),
                                           (48, r"alignment = 48 is not a power of two"),
                                           (1 << 31, r"tensor data would start at offset 2147483648")],
                         ids=["0", "48", "2^31"])
def test_bad_alignment(value, pattern, tmp_path, bin_dir):
    """general.alignment: zero, not a power of two, or so large that the data would start past the end."""
    buf = bytearray((ROOT / "tests/fuzz/corpus-gguf/align-64").read_bytes())
    lay = make_bad.layout(bytes(buf))
    struct.pack_into("<I", buf, _value_pos(lay, "general.alignment") + 4, value)
    bad = tmp_path / "align.gguf"
    bad.write_bytes(bytes(buf))
    clean_failure(cli(bin_dir, bad, "-p", "hi", "-n", "1"), pattern)


def test_tensor_count_minus_one_is_not_a_crash(tiny, tmp_path, bin_dir):
    """One tensor fewer than written: the last tensor info is read as tensor data, the data section
    moves and the weights are garbage. The reader cannot tell; the run must end in an error (NaN
    logits) or in output, never a crash."""
    buf = bytearray(tiny.read_bytes())
    struct.pack_into("<Q", buf, 8, len(make_bad.layout(bytes(buf)).tensors) - 1)
    bad = tmp_path / "minus-one.gguf"
    bad.write_bytes(bytes(buf))
    r = cli(bin_dir, bad, "-p", "hi", "-n", "2")
    no_crash(r)
    if r.returncode != 0:
        clean_failure(r, r"NaN|missing|past the end")


# ---- context sizes and overflow ------------------------------------------------------------------


def test_absurd_context_from_the_file_with_c0(tiny, tmp_path, bin_dir):
    """context_length = 2^24 (the largest accepted) and -c 0 (use the model's): the 4 GiB KV cache is
    either reserved and the run succeeds, or the run fails with "out of memory"; never a crash."""
    buf = bytearray(tiny.read_bytes())
    struct.pack_into("<I", buf, _value_pos(make_bad.layout(bytes(buf)), "llama.context_length") + 4, 1 << 24)
    big = tmp_path / "ctx-2^24.gguf"
    big.write_bytes(bytes(buf))
    r = cli(bin_dir, big, "-p", "hi", "-n", "2", "-c", "0")
    no_crash(r)
    if r.returncode != 0:
        clean_failure(r, r"out of memory")
    r = cli(bin_dir, big, "-p", "hi", "-n", "2")  # default -c: min(model, 4096)
    assert r.returncode == 0, r.stderr
    assert re.search(r"kv cache: +\d+/4096 tokens", r.stderr), r.stderr


def test_absurd_c_on_smollm2(bin_dir, smollm2):
    """-c 2^24 asks for a 360 GiB KV cache: an immediate "out of memory" naming the size."""
    t0 = time.perf_counter()
    r = cli(bin_dir, smollm2, "-p", "hi", "-n", "1", "-c", str(1 << 24))
    clean_failure(r, r"out of memory.*KV cache .*MiB")
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("prompt,n_ctx", [("hello world", 2), ("hello", 1)], ids=["c2", "c1"])
def test_prompt_that_fills_the_context(bin_dir, smollm2, prompt, n_ctx):
    """A prompt of exactly n_ctx tokens leaves no room to generate: an error (the longer-than-context
    row is test_cli.py::test_prompt_longer_than_context_is_an_error)."""
    clean_failure(cli(bin_dir, smollm2, "-p", prompt, "-c", str(n_ctx)), rf"context holds {n_ctx}")


def test_n_predict_past_the_context(bin_dir, smollm2):
    """-n larger than the room left: generation stops at a full context, exit 0, stats printed."""
    r = cli(bin_dir, smollm2, "-p", "Count: 1, 2, 3,", "-n", "100", "-c", "16", "--temp", "0")
    no_crash(r)
    assert r.returncode == 0, r.stderr
    assert "context full after 16 tokens" in r.stderr
    assert re.search(r"kv cache: +16/16 tokens", r.stderr), r.stderr


# (name, extra options, what must happen): the context (-c 64) or the KV budget (1 MiB of int8 chunks,
# about 95 tokens) runs out while 120 tokens are asked for. error: generation stops with a message,
# exit 0; shift: all 120 are generated; demote: older chunks go to int2 and generation goes on past
# what the error policy reached (demote cannot help when -c itself is the limit).
OVERFLOW = [
    ("error-ctx", ["-c", "64", "--kv-overflow", "error"], r"context full after 64 tokens"),
    ("shift-ctx", ["-c", "64", "--kv-overflow", "shift", "--kv", "int4"], None),
    ("demote-ctx", ["-c", "64", "--kv-overflow", "demote"], r"context full after 64 tokens"),
    ("error-budget", ["-c", "512", "--kv", "int8", "--kv-budget", "1M", "--kv-overflow", "error"],
     r"context full after \d+ tokens: stopping \(context full: the KV budget \(1.00 MiB\) holds no more chunks"),
    ("shift-budget", ["-c", "512", "--kv", "int8", "--kv-budget", "1M", "--kv-overflow", "shift"], None),
    ("demote-budget", ["-c", "512", "--kv", "int8", "--kv-budget", "1M", "--kv-overflow", "demote"], "int2"),
]


@pytest.mark.parametrize("name,opts,expect", OVERFLOW, ids=[o[0] for o in OVERFLOW])
def test_kv_overflow_policy(bin_dir, smollm2, name, opts, expect):
    r = cli(bin_dir, smollm2, "-p", "Count: 1, 2, 3,", "-n", "120", "--temp", "0", "-t", "2", *opts)
    no_crash(r)
    assert r.returncode == 0, r.stderr
    n_gen = int(re.search(r"generation: +(\d+) tokens", r.stderr).group(1))
    if expect is None:  # shift: never full
        assert n_gen == 120 and "context full" not in r.stderr, r.stderr
    elif expect == "int2":  # demote under a budget: chunks were re-encoded to int2
        n_int2 = int(re.search(r"int2 (\d+)", r.stderr).group(1))
        assert n_int2 > 0 and n_gen > 100, r.stderr
    else:
        assert re.search(expect, r.stderr), r.stderr
        assert n_gen < 120


# ---- Ctrl-C --------------------------------------------------------------------------------------


def _sigint_after(args: list, n_bytes: int, delay: float = 0.0, timeout: float = 120) -> tuple[int, bytes, str]:
    """Start args, wait until stdout has n_bytes and then delay seconds, send SIGINT, return (exit
    status, stdout, stderr)."""
    p = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n_bytes:
            assert time.monotonic() < deadline, f"no output after {timeout} s: {out[-200:]!r}"
            ready, _, _ = select.select([p.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(p.stdout.fileno(), 65536)
                assert chunk, f"moqae-cli ended before the signal: {p.wait()} {p.stderr.read().decode()[-2000:]}"
                out += chunk
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, out + rest, err.decode("utf-8", "replace")


def test_ctrl_c_during_generation(bin_dir, smollm2):
    prompt = "1, 2, 3, 4, 5, 6,"  # greedy decoding keeps counting: no end-of-text before the signal
    rc, out, err = _sigint_after([bin_dir / "moqae-cli", "-m", smollm2, "-p", prompt, "-n", "-1", "-c", "4096",
                                  "--temp", "0", "-t", "2"], len(prompt) + 12)
    assert rc == 0, err
    assert "interrupted" in err, err
    assert re.search(r"generation: +\d+ tokens", err) and "kv cache:" in err, err
    n_gen = int(re.search(r"generation: +(\d+) tokens", err).group(1))
    assert 0 < n_gen < 4000, err
    assert not any(m in err for m in CRASH_MARKERS), err


def test_ctrl_c_during_the_prompt(bin_dir, smollm2):
    """The signal lands while a ~5,500-token prompt is evaluated in 16-token micro-batches (0.5 s after
    moqae-cli echoes it, so that the evaluation has begun): decode stops at a micro-batch boundary,
    nothing is generated, the stats are printed, exit 0."""
    text = HEAD.read_bytes()
    rc, out, err = _sigint_after([bin_dir / "moqae-cli", "-m", smollm2, "-f", HEAD, "-n", "8", "-c", "8192",
                                  "-b", "16", "-t", "1"], len(text), delay=0.5)
    assert rc == 0, err
    assert "interrupted" in err, err
    m = re.search(r"kv cache: +(\d+)/8192 tokens", err)
    assert m, err
    assert int(m.group(1)) < 5000, f"the prompt ran to the end: {err}"


def _cli_with_sigint_at_flush(so: Path, bin_dir: Path, model: Path, n_flush: int) -> subprocess.CompletedProcess:
    """moqae-cli on a 3,000-byte prompt (~1,500 tokens of the tiny model, 16-token micro-batches) with
    SIGINT raised right after its n_flush-th fflush(stdout): 1 = just after the prompt is echoed, before
    its evaluation starts; 1 + k = just after the k-th generated piece."""
    prompt = HEAD.read_text(encoding="utf-8")[:3000]
    env = dict(os.environ, LD_PRELOAD=str(so), INJECT_SIGINT_FLUSH=str(n_flush))
    return run_tool([bin_dir / "moqae-cli", "-m", model, "-p", prompt, "-n", "8", "-c", "4096", "-b", "16", "-t", "2",
                     "--temp", "0"], timeout=120, env=env, errors="replace")


def test_ctrl_c_exactly_after_a_piece(inject, bin_dir, tiny):
    """Ctrl-C right after the 2nd generated piece is printed: generation ends with 2 tokens, exit 0."""
    r = _cli_with_sigint_at_flush(inject, bin_dir, tiny, 3)
    no_crash(r)
    assert r.returncode == 0, r.stderr
    assert "interrupted" in r.stderr and re.search(r"generation: +2 tokens", r.stderr), r.stderr


def test_ctrl_c_before_the_prompt_is_evaluated(inject, bin_dir, tiny):
    """Ctrl-C after the prompt is echoed but before moqae_decode starts must not be lost: the prompt's
    evaluation stops at its first micro-batch boundary instead of running to the end (with a long
    prompt that is minutes of work the user asked to stop). Regression test for the race in
    runtime/tools/cli.c: moqae_decode clears the interrupt flag when it starts (moqae.h)."""
    r = _cli_with_sigint_at_flush(inject, bin_dir, tiny, 1)
    no_crash(r)
    assert r.returncode == 0, r.stderr
    assert "interrupted" in r.stderr, r.stderr
    n_prompt = int(re.search(r"prompt: +(\d+) tokens", r.stderr).group(1))
    n_kv = int(re.search(r"kv cache: +(\d+)/", r.stderr).group(1))
    assert n_kv < n_prompt, f"all {n_prompt} prompt tokens were evaluated after Ctrl-C:\n{r.stderr}"


# ---- prompt files and options --------------------------------------------------------------------


def test_empty_prompt(bin_dir, smollm2):
    clean_failure(cli(bin_dir, smollm2, "-p", ""), r"the prompt is empty")


def test_prompt_of_invalid_utf8(bin_dir, smollm2, tmp_path):
    """Invalid UTF-8, NUL bytes and lone surrogates are tokenized byte-wise, never rejected."""
    f = tmp_path / "bytes.txt"
    f.write_bytes(b"ok \xff\xfe\xc3\x28 \x00 \xed\xa0\x80 \xf4\x90\x80\x80 end")
    r = cli(bin_dir, smollm2, "-f", f, "-n", "2", "--temp", "0", errors="replace")
    no_crash(r)
    assert r.returncode == 0, r.stderr


def test_prompt_file_empty(bin_dir, smollm2, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_bytes(b"")
    clean_failure(cli(bin_dir, smollm2, "-f", f), r"prompt file '.*empty.txt' is empty")


def test_prompt_file_missing(bin_dir, smollm2, tmp_path):
    clean_failure(cli(bin_dir, smollm2, "-f", tmp_path / "nope.txt"), r"cannot open '.*nope.txt': No such file")


def test_prompt_file_is_a_directory(bin_dir, smollm2, tmp_path):
    clean_failure(cli(bin_dir, smollm2, "-f", tmp_path), r"cannot read '.*': Is a directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files of any mode")
def test_prompt_file_unreadable(bin_dir, smollm2, tmp_path):
    f = tmp_path / "secret.txt"
    f.write_text("hello")
    f.chmod(0)
    clean_failure(cli(bin_dir, smollm2, "-f", f), r"cannot open '.*secret.txt': Permission denied")


def test_prompt_file_read_error(bin_dir, smollm2):
    """A file that opens but fails to read (as root too): /proc/self/clear_refs is write-only."""
    f = Path("/proc/self/clear_refs")
    if not f.exists():
        pytest.skip("no /proc/self/clear_refs on this system")
    clean_failure(cli(bin_dir, smollm2, "-f", f), r"cannot (open|read) '/proc/self/clear_refs'")


# test_cli.py::test_bad_options has -n abc, --temp nan, --bogus, -p with -f.
BAD_CLI_OPTIONS = [
    (["-c", "-5"], r"option -c expects an integer in \[0, 16777216\], got '-5'"),
    (["-c", "16777217"], r"option -c expects an integer .* got '16777217'"),
    (["-c", "1e3"], r"option -c expects an integer .* got '1e3'"),
    (["-c", "99999999999999999999"], r"option -c expects an integer"),
    (["-c", ""], r"option -c expects an integer"),
    (["-n", "-2"], r"option -n expects an integer in \[-1,"),
    (["-n", "12abc"], r"option -n expects an integer"),
    (["-t", "0"], r"option -t expects an integer in \[1, 1024\]"),
    (["-b", "0"], r"option -b expects an integer in \[1,"),
    (["-s", "-1"], r"option -s expects an integer"),
    (["--top-k", "-1"], r"option --top-k expects an integer"),
    (["--top-p", "2"], r"option --top-p expects a number in \[0, 1\]"),
    (["--min-p", "inf"], r"option --min-p expects a number"),
    (["--temp", "-1"], r"option --temp expects a number in \[0, 100\]"),
    (["--repeat-penalty", "0"], r"option --repeat-penalty expects a number"),
    (["--kv", "int3"], r"KV policy 'int3'"),
    (["-n"], r"option -n needs a value"),
    (["--kv-budget", "abc"], r"--kv-budget expects a positive size"),
    (["--kv-budget", "99999999999G"], r"--kv-budget expects a positive size"),
    (["--kv-overflow", "bogus"], r"--kv-overflow expects error, shift or demote"),
    (["--kv-chunk", "48"], r"--kv-chunk must be 32 or 64"),
]


@pytest.mark.parametrize("args,pattern", BAD_CLI_OPTIONS, ids=[" ".join(a) for a, _ in BAD_CLI_OPTIONS])
def test_bad_cli_option(bin_dir, smollm2, args, pattern):
    clean_failure(cli(bin_dir, smollm2, "-p", "hi", *args), pattern)


def test_no_model_option(bin_dir):
    clean_failure(run_tool([bin_dir / "moqae-cli", "-p", "hi"]), r"no model given")


@pytest.mark.parametrize("args,pattern", [
    (["-c", "3"], r"option -c expects an integer in \[4,"),
    (["--chunks", "0"], r"option --chunks expects an integer in \[1,"),
    (["-b", "x"], r"option -b expects an integer"),
], ids=["-c 3", "--chunks 0", "-b x"])
def test_bad_perplexity_option(bin_dir, smollm2, args, pattern):
    clean_failure(run_tool([bin_dir / "moqae-perplexity", "-m", smollm2, "-f", HEAD, *args]), pattern)


def test_perplexity_without_file(bin_dir, smollm2):
    clean_failure(run_tool([bin_dir / "moqae-perplexity", "-m", smollm2]), r"both -m MODEL and -f FILE are required")


# ---- injected allocation failures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def inject(tmp_path_factory, bin_dir) -> Path:
    """tests/fuzz/inject.c built as a shared library (skips where it cannot work)."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        pytest.skip("no C compiler to build tests/fuzz/inject.c")
    if not sys.platform.startswith("linux"):
        pytest.skip("tests/fuzz/inject.c needs glibc")
    ldd = subprocess.run(["ldd", str(bin_dir / "moqae-cli")], capture_output=True, text=True).stdout
    if "libasan" in ldd or "libtsan" in ldd:
        pytest.skip("moqae-cli is built with a sanitizer, which replaces malloc itself: use the normal build")
    so = tmp_path_factory.mktemp("inject") / "inject.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(so), str(INJECT_SRC)], check=True)
    return so


def _run_failing(so: Path, args: list, nth: int, persist: bool = False, min_bytes: int = 0,
                 report: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, LD_PRELOAD=str(so), FAILMALLOC_NTH=str(nth), FAILMALLOC_PERSIST="1" if persist else "0",
               FAILMALLOC_MIN=str(min_bytes))
    if report:
        env["FAILMALLOC_REPORT"] = str(report)
    return run_tool(args, timeout=120, env=env, errors="replace")


def _sweep(so: Path, args: list, tmp_path: Path, persist: bool, min_bytes: int = 0) -> int:
    """Fail each counted allocation in turn; returns how many were counted. Each run must succeed with
    the unfailing run's output (a failure nobody noticed must not change the result) or exit 1 with an
    out-of-memory message."""
    report = tmp_path / "report.txt"
    base = _run_failing(so, args, 0, min_bytes=min_bytes, report=report)
    assert base.returncode == 0, base.stderr
    count = int(report.read_text().split()[1])
    assert count > 0
    for nth in range(1, count + 1):
        r = _run_failing(so, args, nth, persist=persist, min_bytes=min_bytes)
        where = f"allocation {nth} of {count} failing{' and all after it' if persist else ''}"
        assert r.returncode >= 0, f"{where}: killed by signal {-r.returncode}\n{r.stderr[-2000:]}"
        no_crash(r)
        if r.returncode == 0:
            assert r.stdout == base.stdout, f"{where}: exit 0 but different output"
        else:
            assert r.returncode == 1, f"{where}: exit {r.returncode}\n{r.stderr[-2000:]}"
            assert re.search(OOM_MESSAGE, r.stderr, re.MULTILINE | re.IGNORECASE), \
                f"{where}: no out-of-memory message:\n{r.stderr[-2000:]}"
    return count


@pytest.mark.parametrize("persist", [False, True], ids=["one", "persistent"])
@pytest.mark.parametrize("case", ["p", "f", "ring"])
def test_alloc_failure_cli(inject, bin_dir, tiny, tmp_path, persist, case):
    """case p: prompt from -p; f: from -f; ring: ~90 prompt tokens into a 64-token sink+int4 ring that
    shifts, so that chunks are encoded and evicted."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello world, once more")
    args = {"p": ["-p", "Hello world, once more", "-n", "4"], "f": ["-f", prompt, "-n", "4"],
            "ring": ["-p", HEAD.read_text(encoding="utf-8")[:200], "-n", "40", "-c", "64", "-b", "16", "--kv",
                     "sink+int4", "--kv-overflow", "shift"]}[case]
    _sweep(inject, [bin_dir / "moqae-cli", "-m", tiny, *args, "--temp", "0", "-t", "2"], tmp_path, persist)


@pytest.mark.parametrize("persist", [False, True], ids=["one", "persistent"])
def test_alloc_failure_perplexity(inject, bin_dir, tiny, tmp_path, persist):
    _sweep(inject, [bin_dir / "moqae-perplexity", "-m", tiny, "-f", HEAD, "-c", "32", "--chunks", "2", "-t", "2"],
           tmp_path, persist)


def test_alloc_failure_large_only_smollm2(inject, bin_dir, smollm2, tmp_path):
    """Only allocations of 1 MiB or more fail (a machine short of memory for the big buffers)."""
    n = _sweep(inject, [bin_dir / "moqae-cli", "-m", smollm2, "-p", "Hello", "-n", "2", "--temp", "0", "-t", "2",
                            "-c", "256"], tmp_path, persist=True, min_bytes=1 << 20)
    assert n >= 2  # at least the KV cache and the tokenizer tables


# ---- concurrent contexts on one model ------------------------------------------------------------


def _greedy(moqae_cpp, model, ctx, prompt: str, n: int) -> list[int]:
    toks = model.tokenize(prompt.encode(), add_special=True, parse_special=False)
    ctx.reset()
    ctx.decode(toks, 1)
    out = []
    for _ in range(n):
        t = int(ctx.logits()[0].argmax())
        out.append(t)
        ctx.decode_one(t)
    return out


def test_concurrent_contexts_on_one_model(smollm2):
    """Four contexts on one model, each on its own thread, give the tokens one context gives alone;
    then two contexts interleaved token by token on one thread do too."""
    try:
        import moqae_cpp
    except ImportError as e:
        pytest.skip(f"the moqae_cpp package is not installed ({e})")
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3,", "def main():"]
    with moqae_cpp.Model(smollm2) as model:
        with moqae_cpp.Context(model, n_ctx=64, n_threads=1) as ctx:
            expect = {p: _greedy(moqae_cpp, model, ctx, p, 8) for p in prompts}
        got, errors = {}, []

        def work(p: str) -> None:
            try:
                with moqae_cpp.Context(model, n_ctx=64, n_threads=1) as c:
                    got[p] = _greedy(moqae_cpp, model, c, p, 8)
            except BaseException as e:  # reported below, in the main thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert got == expect

        a, b = moqae_cpp.Context(model, n_ctx=64, n_threads=2), moqae_cpp.Context(model, n_ctx=64, n_threads=2)
        with a, b:
            ta = model.tokenize(prompts[0].encode(), add_special=True, parse_special=False)
            tb = model.tokenize(prompts[1].encode(), add_special=True, parse_special=False)
            a.decode(ta, 1)
            b.decode(tb, 1)
            out_a, out_b = [], []
            for _ in range(8):
                out_a.append(int(a.logits()[0].argmax()))
                out_b.append(int(b.logits()[0].argmax()))
                a.decode_one(out_a[-1])
                b.decode_one(out_b[-1])
        assert out_a == expect[prompts[0]] and out_b == expect[prompts[1]]
