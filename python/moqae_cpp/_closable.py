# _closable.py — the one shape every handle class shares (STYLE.md §9): an idempotent close() that the
# class defines, `with` support, and __del__ as a fallback only (never ffi.gc for models or contexts).
from __future__ import annotations


class Closable:
    """Mixin: `with obj:` closes it; garbage collection closes it too, as a last resort."""

    def close(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # fallback only: call close()
        try:
            self.close()
        except Exception:
            pass
