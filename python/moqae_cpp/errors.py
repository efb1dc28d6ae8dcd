# errors.py — the exception hierarchy and the one place C status codes become Python exceptions.
# Every fallible C call goes through _check(status); callers never see status codes. Each class
# derives from MoqaeError *and* the builtin that fits, so `except ValueError` works as in
# llama-cpp-python and `except moqae_cpp.MoqaeError` catches everything from the library.
from __future__ import annotations

from ._native import ffi, lib


class MoqaeError(Exception):
    """Base of every error reported by libmoqae. `status` is the C status name, `message` the C
    message (moqae_last_error())."""

    def __init__(self, message: str, status: str = ""):
        super().__init__(message)
        self.message = message
        self.status = status


class ModelNotFoundError(MoqaeError, FileNotFoundError):
    """A model or router file could not be opened."""


class InvalidArgumentError(MoqaeError, ValueError):
    """A bad argument or option."""


class FormatError(MoqaeError, ValueError):
    """A malformed file (bad magic, truncated, bad offsets)."""


class UnsupportedError(MoqaeError, ValueError):
    """A well-formed file or option this build does not support."""


class InvalidTokenError(MoqaeError, ValueError):
    """A token id outside [0, n_vocab)."""


class ContextFullError(MoqaeError, ValueError):
    """The tokens do not fit in the context (n_ctx)."""


class KeyNotFoundError(MoqaeError, KeyError):
    """A metadata key is absent."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class Interrupted(MoqaeError, RuntimeError):
    """Llama.interrupt() (moqae_context_interrupt) stopped a running evaluation."""


class MoqaeMemoryError(MoqaeError, MemoryError):
    """An allocation in the library failed."""


class MoqaeRuntimeError(MoqaeError, RuntimeError):
    """Any other failure (I/O errors other than a missing file, internal errors)."""


class ClosedError(MoqaeError, ValueError):
    """The object was used after close() (like an operation on a closed file)."""


_BY_STATUS = {
    lib.MOQAE_ERR_INVALID_ARG: InvalidArgumentError,
    lib.MOQAE_ERR_FORMAT: FormatError,
    lib.MOQAE_ERR_UNSUPPORTED: UnsupportedError,
    lib.MOQAE_ERR_OUT_OF_MEMORY: MoqaeMemoryError,
    lib.MOQAE_ERR_CONTEXT_FULL: ContextFullError,
    lib.MOQAE_ERR_INTERRUPTED: Interrupted,
    lib.MOQAE_ERR_INVALID_TOKEN: InvalidTokenError,
    lib.MOQAE_ERR_NOT_FOUND: KeyNotFoundError,
}


def _error(status: int, path: str | None = None) -> MoqaeError:
    message = ffi.string(lib.moqae_last_error()).decode("utf-8", "replace")
    name = ffi.string(lib.moqae_status_name(status)).decode("ascii", "replace")
    if not message:
        message = name
    if status == lib.MOQAE_ERR_IO:
        # The C side says IO for "could not open/read/map"; a missing file is the common case and
        # gets FileNotFoundError, like open().
        import os

        if path is not None and not os.path.exists(path):
            return ModelNotFoundError(message, name)
        return MoqaeRuntimeError(message, name)
    return _BY_STATUS.get(status, MoqaeRuntimeError)(message, name)


def _check(status: int, path: str | None = None) -> None:
    """Raise the MoqaeError subclass for a non-zero status, with the C message."""
    if status != lib.MOQAE_OK:
        raise _error(status, path)
