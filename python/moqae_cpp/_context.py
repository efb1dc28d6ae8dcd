# _context.py — Context: one moqae_context handle (KV cache, scratch, worker threads) on a Model.
# It keeps its model alive and is freed before it. A lock serialises the C calls on the handle, so
# misuse from two threads waits instead of corrupting memory (the rule is still one context per
# thread); interrupt() is the one call that may come from anywhere. Logits come back as numpy copies.
from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np

from ._model import Model, _token_array
from ._native import ffi, lib
from .errors import ClosedError, InvalidArgumentError, _check
from ._closable import Closable


class _ContextHandle:
    """The raw pointer, shared with the Model so it can free us first. Holds no Python references."""

    __slots__ = ("ptr", "lock", "ptr_lock", "__weakref__")

    def __init__(self, ptr):
        self.ptr = ptr
        self.lock = threading.Lock()  # held during every C call on ptr
        self.ptr_lock = threading.Lock()  # guards ptr itself, for interrupt() against free()

    def free(self) -> None:
        with self.ptr_lock:  # stop a decode running on another thread so we do not wait for it
            if self.ptr != ffi.NULL:
                lib.moqae_context_interrupt(self.ptr)
        with self.lock, self.ptr_lock:
            ptr, self.ptr = self.ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.moqae_context_free(ptr)


@ffi.def_extern()
def moqae_py_ppl_progress(chunk, n_chunks, ppl, user_data):
    state = ffi.from_handle(user_data)
    try:
        if state["callback"] is not None and state["callback"](int(chunk), int(n_chunks), float(ppl)) is False:
            return False
        return True
    except BaseException as e:  # KeyboardInterrupt included: stop the C loop, re-raise after it
        state["error"] = e
        return False


_OVERFLOW = {"error": 0, "shift": 1, "demote": 2}  # enum moqae_kv_overflow_policy
_KEYS = {"pre": 0, "post": 1}  # enum moqae_kv_keys


class Context(Closable):
    """A context on model. Options start from moqae_context_default_params(); None keeps the C
    default (n_ctx: the model's training context; n_batch: 512; n_threads: all CPUs; kv: fp16)."""

    def __init__(self, model: Model, *, n_ctx: int | None = None, n_batch: int | None = None,
                 n_threads: int | None = None, kv: str | None = None, router=None, kv_budget: int | None = None,
                 kv_overflow: str | None = None, kv_bits: float | None = None, kv_keys: str | None = None):
        self._h = None
        self.model = model  # keeps the model alive while we exist
        self.router = router  # and the router (a moqae_cpp.Router or None)
        params = ffi.new("struct moqae_context_params *", lib.moqae_context_default_params())
        if n_ctx is not None:
            params.n_ctx = n_ctx
        if n_batch is not None:
            params.n_batch = n_batch
        if n_threads is not None:
            params.n_threads = n_threads
        self._kv = ffi.new("char[]", kv.encode("utf-8")) if kv is not None else ffi.NULL
        params.kv = self._kv
        if router is not None:
            params.router = router.ptr
        if kv_budget is not None:
            if isinstance(kv_budget, bool) or not isinstance(kv_budget, int) or kv_budget < 0:
                raise InvalidArgumentError(f"kv_budget must be a number of bytes >= 0, got {kv_budget!r}")
            params.kv_budget = kv_budget
        if kv_bits is not None:
            if isinstance(kv_bits, bool) or not isinstance(kv_bits, (int, float)):
                raise InvalidArgumentError(f"kv_bits must be a number of bits per element, got {kv_bits!r}")
            params.kv_bits = float(kv_bits)  # the C library checks the range
        if kv_overflow is not None:
            if kv_overflow not in _OVERFLOW:
                raise InvalidArgumentError(f"kv_overflow must be one of {', '.join(_OVERFLOW)}, got {kv_overflow!r}")
            params.kv_overflow = _OVERFLOW[kv_overflow]
        if kv_keys is not None:
            if kv_keys not in _KEYS:
                raise InvalidArgumentError(f"kv_keys must be one of {', '.join(_KEYS)}, got {kv_keys!r}")
            params.kv_keys = _KEYS[kv_keys]
        out = ffi.new("struct moqae_context **")
        _check(lib.moqae_context_new(model.ptr, params, out))
        self._h = _ContextHandle(out[0])
        model._register(self._h)
        self.n_vocab = model.n_vocab
        self._n_ctx = int(lib.moqae_context_n_ctx(out[0]))
        self._logits_out = ffi.new("const float **")
        self._one = ffi.new("int32_t[1]")

    # ---- lifetime ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._h is None or self._h.ptr == ffi.NULL

    def _ptr(self):
        h = self._h
        if h is None or h.ptr == ffi.NULL:
            raise ClosedError("the context is closed")
        return h.ptr

    def close(self) -> None:
        """Free the context (its model stays open). Idempotent."""
        h = self._h
        if h is not None:
            h.free()
            self.model._unregister(h)


    # ---- state ---------------------------------------------------------------------------------

    def n_ctx(self) -> int:
        self._ptr()
        return self._n_ctx

    def n_past(self) -> int:
        with self._h.lock:
            return int(lib.moqae_context_n_past(self._ptr()))

    def reset(self) -> None:
        with self._h.lock:
            _check(lib.moqae_context_reset(self._ptr()))

    def interrupt(self) -> None:
        """Ask a decode running on another thread to stop (it raises moqae_cpp.Interrupted)."""
        h = self._h
        if h is not None:
            with h.ptr_lock:
                if h.ptr != ffi.NULL:
                    lib.moqae_context_interrupt(h.ptr)

    # ---- evaluation ----------------------------------------------------------------------------

    def decode(self, tokens: Sequence[int], n_logits: int) -> None:
        """Append tokens to the context and keep the logits of the last n_logits of them."""
        arr = _token_array(tokens)
        with self._h.lock:
            _check(lib.moqae_decode(self._ptr(), arr, len(arr), n_logits))

    def decode_one(self, token: int) -> None:
        """decode([token], 1) without building a list (the per-token path of generation)."""
        try:
            self._one[0] = token
        except OverflowError:
            self.decode([token], 1)  # reports the invalid id
        with self._h.lock:
            _check(lib.moqae_decode(self._ptr(), self._one, 1, 1))

    def logits_ptr(self, i: int):
        """float * to row i of the last decode's kept logits. Valid until the next decode, reset or
        close on this context; use logits() for a copy."""
        with self._h.lock:
            _check(lib.moqae_context_logits(self._ptr(), i, self._logits_out))
            return self._logits_out[0]

    def logits(self, first: int = 0, count: int = 1) -> np.ndarray:
        """A (count, n_vocab) float32 copy of the kept logits rows first .. first+count-1."""
        out = np.empty((count, self.n_vocab), dtype=np.float32)
        for r in range(count):
            p = self.logits_ptr(first + r)
            out[r] = np.frombuffer(ffi.buffer(p, self.n_vocab * 4), dtype=np.float32)
        return out

    # ---- statistics and perplexity -------------------------------------------------------------

    def kv_stats(self) -> dict:
        s = ffi.new("struct moqae_kv_stats *")
        with self._h.lock:
            _check(lib.moqae_context_kv_stats(self._ptr(), s))
        return {
            "n_tokens": s.n_tokens,
            "n_ctx": s.n_ctx,
            "n_chunks": dict(zip(("fp16", "int8", "int4", "int2"), (int(x) for x in s.n_chunks))),
            "nominal_bits": s.nominal_bits,
            "effective_bits": s.effective_bits,
            "bytes_used": s.bytes_used,
            "bytes_reserved": s.bytes_reserved,
            "n_records": dict(zip(("fp16", "int8", "int4", "int2"), (int(x) for x in s.n_records))),
        }

    def perplexity(self, tokens: Sequence[int], *, n_ctx: int | None = None, n_chunks: int | None = None,
                   progress: Callable[[int, int, float], object] | None = None) -> dict:
        """moqae_perplexity over tokens; leaves the context reset. progress(chunk, n_chunks, ppl)
        is called after each window; returning False stops early. Ctrl-C stops it cleanly."""
        arr = _token_array(tokens)
        params = ffi.new("struct moqae_ppl_params *", lib.moqae_ppl_default_params())
        if n_ctx is not None:
            params.n_ctx = n_ctx
        if n_chunks is not None:
            params.n_chunks = n_chunks
        state = {"callback": progress, "error": None}
        handle = ffi.new_handle(state)
        params.progress = lib.moqae_py_ppl_progress
        params.user_data = handle
        res = ffi.new("struct moqae_ppl_result *")
        with self._h.lock:
            st = lib.moqae_perplexity(self._ptr(), arr, len(arr), params, res)
        if state["error"] is not None:
            raise state["error"]
        _check(st)
        return {"ppl": res.ppl, "ppl_err": res.ppl_err, "nll": res.nll, "n_scored": res.n_scored,
                "n_chunks": res.n_chunks}
