# _router.py — Router: one moqae_router handle (a MoQAE router GGUF checked against a model). The C
# router keeps no reference to the model; contexts that use it keep this object alive, and Llama
# closes its context before its router.
from __future__ import annotations

import os

from ._closable import Closable
from ._model import Model
from ._native import ffi, lib
from .errors import ClosedError, _check

_CODEC_OF_BITS = {16: "fp16", 8: "int8", 4: "int4", 2: "int2"}


class Router(Closable):
    """A router file (docs/ROUTER-FORMAT.md) loaded for model. Raises moqae_cpp.FileError when it
    cannot be read, FormatError when it is malformed, InvalidArgumentError when it was made for
    another model, UnsupportedError for an expert or input layer this runtime lacks."""

    def __init__(self, model: Model, path: str | os.PathLike):
        self._ptr = ffi.NULL
        self.path = os.fspath(path)
        out = ffi.new("struct moqae_router **")
        _check(lib.moqae_router_load(model.ptr, os.fsencode(self.path), out), self.path)
        self._ptr = out[0]
        info = ffi.new("struct moqae_router_info *")
        _check(lib.moqae_router_get_info(self._ptr, info))
        bits = [int(info.expert_bits[i]) for i in range(info.n_expert)]
        self.info = {
            "format_version": int(info.format_version),
            "chunk_size": int(info.chunk_size),
            "experts": [_CODEC_OF_BITS[b] for b in bits],
            "expert_bits": bits,
            "n_router": int(info.n_router),
            "group_size": int(info.group_size),
            "hidden_size": int(info.hidden_size),
            "freeze_first_chunk": bool(info.freeze_first_chunk),
            "lambda": float(getattr(info, "lambda")),
            "expected_bits": float(info.expected_bits),
        }

    @property
    def ptr(self):
        if self._ptr == ffi.NULL:
            raise ClosedError("the router is closed")
        return self._ptr

    @property
    def closed(self) -> bool:
        return self._ptr == ffi.NULL

    def close(self) -> None:
        """Free the router. Close the contexts that use it first. Idempotent."""
        ptr, self._ptr = self._ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.moqae_router_free(ptr)
