"""test_bad_input.py — moqae-cli on broken model files: a clear error, never a crash.

Each case runs `moqae-cli -m BAD -p hi -n 1` (binary from $MOQAE_BIN_DIR, default build/) on a
file from models/make_bad.py (patched copies of a tiny model from models/make_tiny.py), or on a
missing path, a directory or an empty file, and asserts: a positive exit status (not 0, not killed
by a signal), no sanitizer report, and a message on stderr naming the problem. It skips, saying
why, when moqae-cli is not built. It does not test the library through Python (test_api does).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))

import make_bad  # noqa: E402
from make_tiny import make_tiny  # noqa: E402

from conftest import clean_failure, no_crash  # noqa: E402

BIN_DIR = Path(os.environ.get("MOQAE_BIN_DIR", ROOT / "build"))
CLI = BIN_DIR / "moqae-cli"


def _need_cli() -> None:
    if not CLI.is_file():
        pytest.skip(f"moqae-cli is not built at {CLI} (cmake -B build && cmake --build build, or set MOQAE_BIN_DIR)")


def _run(model: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), "-m", str(model), "-p", "hi", "-n", "1"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, errors="replace", timeout=120)


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad_input") / "tiny.gguf"
    try:
        make_tiny(path, vocab="bpe", wtype="q4_0")
    except RuntimeError:  # models/tiny_vocab.py not there: any vocabulary will do here
        make_tiny(path, vocab="bytes", wtype="q4_0")
    return path


def test_good_model_runs(good_model):
    """The control: the unpatched tiny model must run, or the failures below prove nothing."""
    _need_cli()
    p = _run(good_model)
    no_crash(p)
    assert p.returncode == 0, f"the good tiny model fails: {p.stderr[-3000:]}"


@pytest.mark.parametrize("name", [n for n in make_bad.MAKERS if n != "nan_weights"])
def test_bad_file(name, good_model, tmp_path):
    _need_cli()
    maker, pattern = make_bad.MAKERS[name]
    bad = maker(good_model, tmp_path / f"bad-{name}.gguf")
    clean_failure(_run(bad), pattern)


def test_nan_weights(good_model, tmp_path):
    """NaN weights are well-formed GGUF. The runtime may reject them (then it must say so) or run
    and produce NaN logits; either way it must not crash."""
    _need_cli()
    maker, pattern = make_bad.MAKERS["nan_weights"]
    p = _run(maker(good_model, tmp_path / "bad-nan.gguf"))
    no_crash(p)
    if p.returncode != 0:
        assert re.search(pattern, p.stderr, re.IGNORECASE), f"stderr does not mention NaN:\n{p.stderr[-3000:]}"


def test_truncated_everywhere(good_model, tmp_path):
    """Cuts in the header, the metadata, the tensor infos and the data."""
    _need_cli()
    lay = make_bad.layout(good_model.read_bytes())
    end = lay.data_end()  # bytes after it are padding: cutting those leaves a valid file
    cuts = sorted({0, 3, 10, 24, 40, lay.data_offset // 2, lay.data_offset - 1, lay.data_offset + 1, end - 1})
    for n in cuts:
        bad = make_bad.truncated(good_model, tmp_path / f"cut-{n}.gguf", n_bytes=n)
        clean_failure(_run(bad), r"past the end|truncated|too small|magic")


def test_missing_file(tmp_path):
    _need_cli()
    clean_failure(_run(tmp_path / "does-not-exist.gguf"), r"No such file")


def test_directory(tmp_path):
    _need_cli()
    clean_failure(_run(tmp_path), r"directory")


def test_empty_file(tmp_path):
    _need_cli()
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    clean_failure(_run(empty), r"0 bytes, too small")
