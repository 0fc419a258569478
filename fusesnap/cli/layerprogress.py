"""Per-blob progress of a pull or push on a terminal: one line per layer, redrawn in place.

Only when stderr is a terminal and --quiet was not given; the lines stay on the
screen when the work ends (the last state of every layer), like docker's.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from ..images.events import Events


def _size(n: int) -> str:
    return f"{n / 1048576:,.1f} MiB" if n >= 1 << 20 else f"{n / 1024:,.1f} KiB"


class LayerProgress(Events):
    def __init__(self, stream: TextIO | None = None, quiet: bool = False, interval: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        self.enabled = not quiet and self.stream.isatty()
        self.interval = interval
        self.rows: list[list] = []  # [label, total, done, state]
        self._lock = threading.Lock()
        self._lines = 0
        self._next = 0.0

    def begin(self, items: list[tuple[str, int]]) -> None:
        with self._lock:
            self.rows = [[label, total, 0, "waiting"] for label, total in items]
        self._draw(force=True)

    def state(self, i: int, state: str) -> None:
        with self._lock:
            if i < len(self.rows):
                self.rows[i][3] = state
                if state in ("exists", "mounted", "done"):
                    self.rows[i][2] = self.rows[i][1]
        self._draw(force=state in ("done", "exists"))

    def advance(self, i: int, n: int) -> None:
        with self._lock:
            if i < len(self.rows):
                self.rows[i][2] += n
        self._draw()

    def end(self) -> None:
        self._draw(force=True)

    def _line(self, row: list) -> str:
        label, total, done, state = row
        short = label[7:19] if label.startswith("sha256:") else label[:40]
        amount = f"{_size(min(done, total))} of {_size(total)}" if total else ""
        return f"{short:<14} {state:<12} {amount}"

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        with self._lock:
            now = time.monotonic()
            if not force and now < self._next:
                return
            self._next = now + self.interval
            out = [f"\x1b[{self._lines}F"] if self._lines else []
            out += [f"\r{self._line(r)}\x1b[K\n" for r in self.rows]
            self._lines = len(self.rows)
            self.stream.write("".join(out))
            self.stream.flush()
