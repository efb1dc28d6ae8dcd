# _build_ffi.py — the cffi builder (out-of-line API mode) for moqae_cpp._native.
# The cdef is derived from runtime/include/moqae.h at build time (comments, preprocessor lines,
# MOQAE_API and the C++ guards are stripped), so there is one source of truth; since the generated
# C includes moqae.h, the compiler checks every declaration against the real header.
# CMake runs `python _build_ffi.py --header moqae.h --output _native.c` and compiles the result
# (see the if(SKBUILD) block of CMakeLists.txt). Nothing here is imported at run time.
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# Declarations that are ours, not the header's: the log callback implemented in Python.
EXTRA_CDEF = """
extern "Python" void moqae_py_log(int level, const char * msg, void * user_data);
extern "Python" bool moqae_py_ppl_progress(int64_t chunk, int64_t n_chunks, double ppl, void * user_data);
"""

_DEFINE_INT = re.compile(r"#\s*define\s+([A-Za-z_]\w*)\s+(\(?-?\s*(?:0x[0-9A-Fa-f]+|\d+)[uUlL]*\)?)\s*$")


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def cdef_from_header(text: str) -> str:
    """Turn the text of moqae.h into a cdef cffi accepts.

    Handles what a plain C header uses: `#if`/`#ifdef` blocks (those testing __cplusplus or _WIN32
    are dropped, the include guard is kept), integer `#define`s (kept, cffi understands them), and
    the MOQAE_API export macro (removed). Anything cleverer should fail loudly in cffi's parser.
    """
    text = _strip_comments(text)
    text = re.sub(r"\\\n", " ", text)  # join continued lines
    out: list[str] = []
    stack: list[bool] = []  # per open #if: whether its current branch is kept
    for line in text.splitlines():
        s = line.strip()
        if not s.startswith("#"):
            if all(stack):
                out.append(line)
            continue
        directive = s[1:].strip()
        word = directive.split(None, 1)[0] if directive else ""
        rest = directive[len(word):].strip()
        if word in ("if", "ifdef", "ifndef"):
            foreign = "__cplusplus" in rest or "_WIN32" in rest
            keep = not foreign if word != "ifndef" else True
            stack.append(keep)
        elif word in ("elif", "else"):
            if not stack:
                raise ValueError(f"#{word} without #if in header")
            stack[-1] = not stack[-1]
        elif word == "endif":
            if not stack:
                raise ValueError("#endif without #if in header")
            stack.pop()
        elif word == "define" and all(stack):
            m = _DEFINE_INT.match(s)
            if m and m.group(1) != "MOQAE_API":
                out.append(f"#define {m.group(1)} {m.group(2).strip('()').replace(' ', '')}")
        # #include, #pragma, #error and non-integer #defines are dropped
    if stack:
        raise ValueError("unterminated #if in header")
    cdef = "\n".join(out)
    cdef = re.sub(r"\bMOQAE_API\b", "", cdef)
    return re.sub(r"\n\s*\n+", "\n", cdef).strip() + "\n"


def exported_functions(text: str) -> list[str]:
    """Names of the functions the header marks MOQAE_API (for the sync test)."""
    text = _strip_comments(text)
    return re.findall(r"\bMOQAE_API\b[^;(]*?\b(moqae_\w+)\s*\(", text)


def default_header() -> Path:
    return Path(__file__).resolve().parents[2] / "runtime" / "include" / "moqae.h"


def make_builder(header: Path | None = None):
    import cffi

    header = Path(header) if header else default_header()
    ffibuilder = cffi.FFI()
    ffibuilder.cdef(cdef_from_header(header.read_text(encoding="utf-8")) + EXTRA_CDEF)
    ffibuilder.set_source("moqae_cpp._native", '#include "moqae.h"', libraries=["moqae"],
                          include_dirs=[str(header.parent)])
    return ffibuilder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Emit the C source of moqae_cpp._native from moqae.h.")
    ap.add_argument("--header", type=Path, default=None, help="path to moqae.h (default: the source tree's)")
    ap.add_argument("--output", type=Path, required=True, help="C file to write")
    args = ap.parse_args(argv)
    make_builder(args.header).emit_c_code(str(args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
