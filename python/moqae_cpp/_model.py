# _model.py — Model: one moqae_model handle (mmapped weights + vocabulary) and the tokenizer calls
# that only read it. It owns the handle: close() frees it, closing first every context made from it
# (a context must never outlive its model). No generation logic here; see llama.py.
from __future__ import annotations

import os
import threading
from typing import Iterable, Sequence

from ._native import ffi, lib
from .errors import ClosedError, InvalidTokenError, _check
from ._closable import Closable

_BUFFER_TOO_SMALL = lib.MOQAE_ERR_BUFFER_TOO_SMALL


def _token_array(tokens: Iterable[int]):
    """int32_t[] copy of tokens; ids that do not even fit in int32 are invalid tokens."""
    if not isinstance(tokens, (list, tuple)):
        tokens = list(tokens)
    try:
        return ffi.new("int32_t[]", tokens)
    except OverflowError as e:
        raise InvalidTokenError(f"token id out of range: {e}", "MOQAE_ERR_INVALID_TOKEN") from None


class Model(Closable):
    """A loaded GGUF model. Read-only after loading; tokenizer methods are thread-safe.

    Keyword options start from moqae_model_default_params(); None keeps the C default.
    """

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int | None = None, use_mlock: bool | None = None):
        self._ptr = ffi.NULL
        self._contexts: dict[int, object] = {}  # id -> _ContextHandle (no reference back to us)
        self._lock = threading.Lock()
        self.path = os.fspath(path)
        params = ffi.new("struct moqae_model_params *", lib.moqae_model_default_params())
        if n_gpu_layers is not None:
            params.n_gpu_layers = n_gpu_layers
        if use_mlock is not None:
            params.use_mlock = use_mlock
        out = ffi.new("struct moqae_model **")
        _check(lib.moqae_model_load(os.fsencode(self.path), params, out), self.path)
        self._ptr = out[0]
        info = ffi.new("struct moqae_model_info *")
        _check(lib.moqae_model_get_info(self._ptr, info))
        self.info = {
            name: getattr(info, name)
            for name in ("n_vocab", "n_ctx_train", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ff",
                         "n_params", "weight_bytes", "token_bos", "token_eos", "add_bos", "add_eos")
        }
        self.info["arch"] = ffi.string(info.arch).decode("utf-8", "replace")
        self.info["name"] = ffi.string(info.name).decode("utf-8", "replace")
        self.n_vocab: int = self.info["n_vocab"]
        self._pieces: dict[int, bytes] = {}  # token -> piece (special=False), filled lazily

    # ---- lifetime ------------------------------------------------------------------------------

    @property
    def ptr(self):
        if self._ptr == ffi.NULL:
            raise ClosedError("the model is closed")
        return self._ptr

    @property
    def closed(self) -> bool:
        return self._ptr == ffi.NULL

    def _register(self, handle) -> None:
        with self._lock:
            self.ptr  # raises if closed
            self._contexts[id(handle)] = handle

    def _unregister(self, handle) -> None:
        with self._lock:
            self._contexts.pop(id(handle), None)

    def close(self) -> None:
        """Free the model, after the contexts still open on it. Idempotent."""
        with self._lock:
            handles = list(self._contexts.values())
            self._contexts.clear()
        for h in handles:
            h.free()
        with self._lock:
            ptr, self._ptr = self._ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.moqae_model_free(ptr)


    # ---- metadata ------------------------------------------------------------------------------

    def meta_str(self, key: str) -> str | None:
        """A string metadata value (e.g. "tokenizer.chat_template"), or None if absent."""
        k = key.encode("utf-8")
        n = ffi.new("size_t *")
        cap = 4096
        while True:
            buf = ffi.new("char[]", cap)
            st = lib.moqae_model_meta_str(self.ptr, k, buf, cap, n)
            if st == lib.MOQAE_ERR_NOT_FOUND:
                return None
            if st == _BUFFER_TOO_SMALL:
                cap = n[0] + 1
                continue
            _check(st)
            return ffi.unpack(buf, n[0]).decode("utf-8", "replace")

    # ---- tokenizer -----------------------------------------------------------------------------

    def tokenize(self, text: bytes, *, add_special: bool, parse_special: bool) -> list[int]:
        n = ffi.new("int64_t *")
        cap = len(text) + 16
        while True:
            buf = ffi.new("int32_t[]", cap)
            st = lib.moqae_tokenize(self.ptr, text, len(text), add_special, parse_special, buf, cap, n)
            if st == _BUFFER_TOO_SMALL:
                cap = n[0]
                continue
            _check(st)
            return ffi.unpack(buf, n[0])

    def token_to_piece(self, token: int, *, special: bool = False) -> bytes:
        if not special:
            piece = self._pieces.get(token)
            if piece is not None:
                return piece
        n = ffi.new("size_t *")
        cap = 64
        while True:
            buf = ffi.new("char[]", cap)
            try:
                st = lib.moqae_token_to_piece(self.ptr, token, special, buf, cap, n)
            except OverflowError:
                raise InvalidTokenError(f"token id {token} out of range", "MOQAE_ERR_INVALID_TOKEN") from None
            if st == _BUFFER_TOO_SMALL:
                cap = n[0]
                continue
            _check(st)
            piece = ffi.unpack(buf, n[0])
            if not special:
                self._pieces[token] = piece
            return piece

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> bytes:
        arr = _token_array(tokens)
        n_tokens = len(arr)
        n = ffi.new("size_t *")
        cap = 16 * n_tokens + 16
        while True:
            buf = ffi.new("char[]", cap)
            st = lib.moqae_detokenize(self.ptr, arr, n_tokens, special, buf, cap, n)
            if st == _BUFFER_TOO_SMALL:
                cap = n[0]
                continue
            _check(st)
            return ffi.unpack(buf, n[0])

    def token_is_eog(self, token: int) -> bool:
        try:
            return bool(lib.moqae_token_is_eog(self.ptr, token))
        except OverflowError:
            return False
