# _text.py — turns generated token pieces (bytes) into text for completions: finds stop strings,
# and for streaming releases only complete UTF-8 and never a suffix that could still become a stop
# string. Pure Python over bytes, no library calls; the streaming and non-streaming paths share it
# so they return the same text.
from __future__ import annotations


def complete_utf8_end(buf: bytes, start: int, end: int) -> int:
    """The largest e <= end such that buf[start:e] does not end inside a UTF-8 sequence that the
    following bytes could still complete (invalid bytes count as complete: they decode to U+FFFD)."""
    for back in range(1, 4):
        p = end - back
        if p < start:
            break
        b = buf[p]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for its lead byte
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return p if p + need > end else end
    return end


class TextAssembler:
    """Accumulates the bytes of a completion and tells how much of it may be shown."""

    def __init__(self, stops: list[bytes]):
        self.stops = [s for s in stops if s]
        self.buf = b""
        self.released = 0  # bytes of buf already handed out
        self.stop_at: int | None = None  # index of the stop string that ended the text

    def push(self, piece: bytes) -> bytes:
        """Add a token's bytes; return newly releasable bytes (complete UTF-8, no possible stop
        prefix). After a stop string is found, `stop_at` is set and the text before it released."""
        self.buf += piece
        buf = self.buf
        # A stop string can only start at or after `released`: a longer held-back suffix would
        # have been held instead (see the hold-back below).
        first = None
        for s in self.stops:
            i = buf.find(s, self.released)
            if i >= 0 and (first is None or i < first):
                first = i
        if first is not None:
            self.stop_at = first
            return self._release(first)
        end = len(buf)
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, end - self.released), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        return self._release(complete_utf8_end(buf, self.released, end - hold))

    def flush(self) -> bytes:
        """At the end of generation: everything not yet released (up to a stop string, if any)."""
        return self._release(self.stop_at if self.stop_at is not None else len(self.buf))

    def text(self) -> bytes:
        """The completion's bytes, cut at the stop string if one was found."""
        return self.buf if self.stop_at is None else self.buf[: self.stop_at]

    def _release(self, end: int) -> bytes:
        if end <= self.released:
            return b""
        out = self.buf[self.released:end]
        self.released = end
        return out
