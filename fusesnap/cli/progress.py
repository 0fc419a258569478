"""Progress of long byte streams (import, export) on a terminal.

Only when stderr is a terminal: scripts and pipes see exactly the documented
output and nothing else. The line is redrawn at most a few times a second so
that the counter never costs measurable time.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from typing import BinaryIO, TextIO


def _mib(n: int) -> str:
    return f"{n / 1048576:,.1f} MiB"


class Progress:
    def __init__(self, verb: str, total: int | None = None, stream: TextIO | None = None,
                 interval: float = 0.1) -> None:
        self.verb = verb
        self.total = total or None
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.interval = interval
        self.done_bytes = 0
        self.start = time.monotonic()
        self._next = self.start + interval
        self._drawn = False

    def add(self, n: int) -> None:
        self.done_bytes += n
        if self.enabled and time.monotonic() >= self._next:
            self._draw()

    def _draw(self) -> None:
        now = time.monotonic()
        self._next = now + self.interval
        rate = self.done_bytes / max(now - self.start, 1e-6)
        pct = f" ({100 * self.done_bytes / self.total:.0f}%)" if self.total else ""
        self.stream.write(f"\r{self.verb}: {_mib(self.done_bytes)}{pct}, {rate / 1e6:,.0f} MB/s\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the line, so that the command's real output starts on a clean line."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


class ProgressReader:
    """A read()-only wrapper that counts what the store consumes."""

    def __init__(self, raw: BinaryIO, progress: Progress) -> None:
        self.raw, self.progress = raw, progress

    def read(self, n: int = -1) -> bytes:
        b = self.raw.read(n)
        self.progress.add(len(b))
        return b


class ProgressWriter:
    """A write()/flush() wrapper that counts what the store produces."""

    def __init__(self, raw: BinaryIO, progress: Progress) -> None:
        self.raw, self.progress = raw, progress

    def write(self, b: bytes | bytearray | memoryview) -> int:
        n = self.raw.write(b)
        self.progress.add(len(b) if n is None else n)
        return len(b) if n is None else n

    def flush(self) -> None:
        self.raw.flush()


def file_size(f: BinaryIO) -> int | None:
    """Size of a regular file behind f (for a percentage), None for pipes."""
    try:
        st = os.fstat(f.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None
