# _sampler.py — Sampler: one moqae_sampler handle (repetition history, RNG, candidate buffers).
# Options start from moqae_sampler_default_params(); None keeps the C default. Sampling reads the
# context's logits in place through the pointer (no copy per token).
from __future__ import annotations

from ._native import ffi, lib
from .errors import ClosedError, _check
from ._closable import Closable

_FIELDS = ("temp", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")


def default_sampler_params() -> dict:
    """moqae_sampler_default_params() as a dict (the source of every sampling default)."""
    p = lib.moqae_sampler_default_params()
    return {name: getattr(p, name) for name in _FIELDS}


class Sampler(Closable):
    def __init__(self, **options):
        self._ptr = ffi.NULL
        params = ffi.new("struct moqae_sampler_params *", lib.moqae_sampler_default_params())
        for name, value in options.items():
            if name not in _FIELDS:
                raise TypeError(f"unknown sampler option {name!r}")
            if value is not None:
                setattr(params, name, value)
        out = ffi.new("struct moqae_sampler **")
        _check(lib.moqae_sampler_new(params, out))
        self._ptr = out[0]
        self._tok = ffi.new("int32_t *")

    def _p(self):
        if self._ptr == ffi.NULL:
            raise ClosedError("the sampler is closed")
        return self._ptr

    def sample(self, logits_ptr, n_vocab: int) -> int:
        """Pick a token from n_vocab floats at logits_ptr (a cdata float *)."""
        _check(lib.moqae_sampler_sample(self._p(), logits_ptr, n_vocab, self._tok))
        return self._tok[0]

    def accept(self, token: int) -> None:
        _check(lib.moqae_sampler_accept(self._p(), token))

    def reset(self, seed: int) -> None:
        _check(lib.moqae_sampler_reset(self._p(), seed))

    def close(self) -> None:
        ptr, self._ptr = self._ptr, ffi.NULL
        if ptr != ffi.NULL:
            lib.moqae_sampler_free(ptr)

