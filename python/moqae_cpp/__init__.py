# moqae_cpp — Python package of moqae.cpp: cffi bindings to libmoqae (moqae.h) and a
# llama-cpp-python-compatible `Llama`. Importing only loads the compiled module, routes the library's
# logs to logging.getLogger("moqae_cpp") and checks that the library is the package's version.
# `import moqae_cpp as llama_cpp` is meant to run llama-cpp-python scripts unchanged.
from __future__ import annotations

import _thread
import atexit
import logging

from ._native import ffi, lib

_logger = logging.getLogger("moqae_cpp")
_LEVELS = {lib.MOQAE_LOG_DEBUG: logging.DEBUG, lib.MOQAE_LOG_INFO: logging.INFO, lib.MOQAE_LOG_WARN: logging.WARNING,
           lib.MOQAE_LOG_ERROR: logging.ERROR}


@ffi.def_extern()
def moqae_py_log(level, msg, user_data):
    # May run on a library worker thread; cffi takes the GIL for us.
    try:
        _logger.log(_LEVELS.get(level, logging.INFO), "%s", ffi.string(msg).decode("utf-8", "replace"))
    except KeyboardInterrupt:  # Ctrl-C landed in this callback, which cannot carry it through C: deliver it
        _thread.interrupt_main()  # again, to fire when the C call returns to Python


lib.moqae_log_set(lib.moqae_py_log, ffi.NULL)
atexit.register(lib.moqae_log_set, ffi.NULL, ffi.NULL)  # no callbacks into a finalizing interpreter


def _enable_verbose_logging() -> None:
    """Llama(verbose=True): show the library's INFO logs on stderr unless logging is configured."""
    if not _logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("moqae: %(message)s"))
        _logger.addHandler(handler)
    if _logger.level == logging.NOTSET or _logger.level > logging.INFO:
        _logger.setLevel(logging.INFO)


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moqae-cpp")
    except PackageNotFoundError:
        return None


__version__ = ffi.string(lib.moqae_version()).decode("ascii")
_pkg_version = _package_version()
if _pkg_version is not None and _pkg_version != __version__:
    raise ImportError(f"moqae_cpp {_pkg_version} loaded libmoqae {__version__}: the installation is inconsistent, "
                      f"reinstall the package (pip install .)")


def has_cuda() -> bool:
    """Whether this build has CUDA kernels and a usable device."""
    return bool(lib.moqae_has_cuda())


def cpu_backend() -> str:
    """The CPU kernel set chosen at run time ("avx512", "avx2" or "scalar")."""
    return ffi.string(lib.moqae_cpu_backend()).decode("ascii")


from ._context import Context  # noqa: E402
from ._model import Model  # noqa: E402
from ._router import Router  # noqa: E402
from ._sampler import Sampler  # noqa: E402
from .errors import (  # noqa: E402
    ClosedError,
    ContextFullError,
    FormatError,
    Interrupted,
    InvalidArgumentError,
    InvalidTokenError,
    KeyNotFoundError,
    ModelNotFoundError,
    MoqaeError,
    MoqaeMemoryError,
    MoqaeRuntimeError,
    UnsupportedError,
)
from .llama import Llama  # noqa: E402

__all__ = [
    "Llama", "Model", "Router", "Context", "Sampler", "MoqaeError", "ModelNotFoundError", "InvalidArgumentError", "FormatError",
    "UnsupportedError", "InvalidTokenError", "ContextFullError", "KeyNotFoundError", "Interrupted",
    "MoqaeMemoryError", "MoqaeRuntimeError", "ClosedError", "has_cuda", "cpu_backend", "__version__",
]
