"""make_bad.py — deliberately broken GGUF files for the bad-input tests (tests/test_bad_input.py).

Each maker copies a good model (e.g. from make_tiny.py) and patches bytes in place: truncation,
wrong magic, a tensor offset past the end, absurd dimensions, an unknown or unsupported tensor
type, a missing required key (renamed in place so the layout stays valid), NaN weights. Fields
are located by a small walker of the GGUF layout below (spec: ggml docs/gguf.md), not by the gguf
package, so that it does not depend on that package's internals. It does not judge the runtime's
reaction: the tests do. CLI: `python models/make_bad.py GOOD.gguf OUTDIR` writes all of them.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import sys
from pathlib import Path

# bytes of each GGUF metadata scalar type (0..12); strings (8) and arrays (9) are variable
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
# ggml type -> (block elements, block bytes) for the types tiny models use
_BLOCKS = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34)}


@dataclasses.dataclass
class TensorLoc:
    name: str
    n_dims: int
    ne: list[int]
    type: int
    offset: int
    ne_pos: list[int]  # file offset of each ne[i] (u64)
    type_pos: int  # file offset of the type (u32)
    offset_pos: int  # file offset of the data offset (u64)

    @property
    def n_bytes(self) -> int | None:
        """Bytes of data (None for a type make_bad does not know)."""
        if self.type not in _BLOCKS:
            return None
        blck, bbytes = _BLOCKS[self.type]
        return math.prod(self.ne) // blck * bbytes


@dataclasses.dataclass
class Layout:
    version: int
    keys: dict[str, int]  # key -> file offset of its bytes (after the u64 length)
    tensors: dict[str, TensorLoc]
    alignment: int
    data_offset: int
    size: int

    def data_end(self) -> int:
        """File offset just past the last tensor's data (gguf-py pads after it, so it may be < size)."""
        ends = [self.data_offset + t.offset + (t.n_bytes or 0) for t in self.tensors.values()]
        return max(ends, default=self.data_offset)


def layout(buf: bytes) -> Layout:
    """Walk a (valid, little-endian) GGUF and record where its fields are."""
    if buf[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos = 24

    def u32() -> int:
        nonlocal pos
        pos += 4
        return struct.unpack_from("<I", buf, pos - 4)[0]

    def u64() -> int:
        nonlocal pos
        pos += 8
        return struct.unpack_from("<Q", buf, pos - 8)[0]

    def string() -> tuple[int, str]:
        nonlocal pos
        n = u64()
        start = pos
        pos += n
        return start, buf[start:pos].decode("utf-8", "replace")

    def skip_value(t: int) -> int | None:
        nonlocal pos
        if t in _SCALAR:
            v = buf[pos:pos + _SCALAR[t]]
            pos += _SCALAR[t]
            return int.from_bytes(v, "little") if t == 4 else None
        if t == _STRING:
            string()
        elif t == _ARRAY:
            et, n = u32(), u64()
            for _ in range(n):
                skip_value(et)
        else:
            raise ValueError(f"bad value type {t}")
        return None

    keys: dict[str, int] = {}
    alignment = 32
    for _ in range(n_kv):
        kpos, key = string()
        keys[key] = kpos
        v = skip_value(u32())
        if key == "general.alignment" and v is not None:
            alignment = v
    tensors: dict[str, TensorLoc] = {}
    for _ in range(n_tensors):
        _, name = string()
        n_dims = u32()
        ne_pos, ne = [], []
        for _ in range(n_dims):
            ne_pos.append(pos)
            ne.append(u64())
        type_pos = pos
        ttype = u32()
        offset_pos = pos
        offset = u64()
        tensors[name] = TensorLoc(name, n_dims, ne, ttype, offset, ne_pos, type_pos, offset_pos)
    data_offset = (pos + alignment - 1) // alignment * alignment
    return Layout(version, keys, tensors, alignment, data_offset, len(buf))


def _load(src: str | Path) -> tuple[bytearray, Layout]:
    buf = bytearray(Path(src).read_bytes())
    return buf, layout(bytes(buf))


def _tensor(lay: Layout, name: str) -> TensorLoc:
    if name not in lay.tensors:
        raise KeyError(f"no tensor '{name}' (have: {', '.join(sorted(lay.tensors))})")
    return lay.tensors[name]


def _write(dst: str | Path, buf: bytes | bytearray) -> Path:
    Path(dst).write_bytes(bytes(buf))
    return Path(dst)


# ---- the makers: each returns dst ----------------------------------------------------------------


def truncated(src, dst, n_bytes: int | None = None) -> Path:
    """The first n_bytes of src (default: cut in the middle of the tensor data)."""
    buf, lay = _load(src)
    if n_bytes is None:
        n_bytes = lay.data_offset + (lay.size - lay.data_offset) // 2
    return _write(dst, buf[:n_bytes])


def wrong_magic(src, dst, magic: bytes = b"GGML") -> Path:
    buf, _ = _load(src)
    buf[0:4] = magic
    return _write(dst, buf)


def offset_past_end(src, dst, tensor: str = "output_norm.weight") -> Path:
    """Move a tensor's data offset to the first aligned offset at or after the end of the file."""
    buf, lay = _load(src)
    t = _tensor(lay, tensor)
    past = lay.size - lay.data_offset
    past = (past + lay.alignment - 1) // lay.alignment * lay.alignment
    struct.pack_into("<Q", buf, t.offset_pos, past)
    return _write(dst, buf)


def absurd_dims(src, dst, tensor: str = "token_embd.weight", ne: int = 1 << 62) -> Path:
    """Set the tensor's last dimension to ne (2^62: the element count overflows 64 bits)."""
    buf, lay = _load(src)
    t = _tensor(lay, tensor)
    struct.pack_into("<Q", buf, t.ne_pos[-1], ne)
    return _write(dst, buf)


def unknown_type(src, dst, tensor: str = "blk.0.attn_q.weight", type_id: int = 1234) -> Path:
    """A tensor type number that ggml never had (1234) or one moqae does not compute (13 = Q5_K)."""
    buf, lay = _load(src)
    t = _tensor(lay, tensor)
    struct.pack_into("<I", buf, t.type_pos, type_id)
    return _write(dst, buf)


def unsupported_type(src, dst, tensor: str = "blk.0.attn_q.weight") -> Path:
    return unknown_type(src, dst, tensor, type_id=13)  # Q5_K


def missing_key(src, dst, key: str = "llama.block_count") -> Path:
    """Rename the key in place (same length, first letter -> 'X') so the file stays well-formed."""
    buf, lay = _load(src)
    if key not in lay.keys:
        raise KeyError(f"no key '{key}'")
    buf[lay.keys[key]] = ord("X")
    return _write(dst, buf)


def nan_weights(src, dst, tensor: str = "output_norm.weight") -> Path:
    """Make every value of the tensor NaN (for block types: every block's fp16 scale d)."""
    buf, lay = _load(src)
    t = _tensor(lay, tensor)
    if t.type not in _BLOCKS:
        raise ValueError(f"tensor '{tensor}' has type {t.type}, not one make_bad knows")
    _, bbytes = _BLOCKS[t.type]
    n_blocks = t.n_bytes // bbytes
    start = lay.data_offset + t.offset
    if t.type == 0:
        nan = struct.pack("<f", float("nan"))
    elif t.type == 30:
        nan = b"\xc0\x7f"  # bf16 quiet NaN
    else:
        nan = b"\x00\x7e"  # fp16 quiet NaN: the element itself, or the scale d that leads each block
    for i in range(n_blocks):
        p = start + i * bbytes
        buf[p:p + len(nan)] = nan
    return _write(dst, buf)


# What the runtime's message should mention for each maker (a regular expression, case-insensitive).
MAKERS = {
    "truncated": (truncated, r"past the end|truncated"),
    "wrong_magic": (wrong_magic, r"magic"),
    "offset_past_end": (offset_past_end, r"past the end"),
    "absurd_dims": (absurd_dims, r"overflow|ne\[\d\]"),
    "unknown_type": (unknown_type, r"unknown tensor type 1234"),
    "unsupported_type": (unsupported_type, r"Q5_K"),
    "missing_key": (missing_key, r"llama\.block_count"),
    "nan_weights": (nan_weights, r"nan|not finite"),
}


def make_all(src, outdir) -> dict[str, Path]:
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    return {name: fn(src, outdir / f"bad-{name}.gguf") for name, (fn, _) in MAKERS.items()}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python models/make_bad.py GOOD.gguf OUTDIR", file=sys.stderr)
        sys.exit(2)
    for name, path in make_all(sys.argv[1], sys.argv[2]).items():
        print(path)
