"""Progress hooks of a pull or a push, per blob; no-ops here, drawn by the CLI on a terminal."""

from __future__ import annotations

import threading


class Events:
    def begin(self, items: list[tuple[str, int]]) -> None:
        """One (label, total bytes) per blob, in manifest order."""

    def state(self, i: int, state: str) -> None:
        """Blob i is now e.g. 'waiting', 'downloading', 'importing', 'exists', 'done'."""

    def advance(self, i: int, n: int) -> None:
        """n more bytes of blob i moved (negative when a download starts over)."""

    def end(self) -> None:
        """The operation finished or failed: leave the terminal clean."""


class Counter(Events):
    """Counts bytes moved, for the summary line and --json (thread-safe)."""

    def __init__(self, inner: Events) -> None:
        self.inner = inner
        self.bytes = 0
        self._lock = threading.Lock()

    def begin(self, items: list[tuple[str, int]]) -> None:
        self.inner.begin(items)

    def state(self, i: int, state: str) -> None:
        self.inner.state(i, state)

    def advance(self, i: int, n: int) -> None:
        with self._lock:
            self.bytes += n
        self.inner.advance(i, n)

    def end(self) -> None:
        self.inner.end()
