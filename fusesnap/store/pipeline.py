"""Extraction in a worker thread, fed in order by the parsing thread.

The main thread parses headers, computes CRCs and writes the tar-split index; the
worker creates files. Most of the worker's time is spent in system calls (open,
write, mkdir), which release the GIL, so the two overlap on a multi-core machine.
Work travels in batches (many small members, or up to BATCH_BYTES of a big one)
to keep queue overhead off the per-member path. Order is preserved: one worker, one
FIFO. The first error in the worker is re-raised in the main thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from ..tarsplit.member import Member
from .extract import Extractor

BATCH_BYTES = 1 << 20
BATCH_ITEMS = 128
QUEUE_BATCHES = 16


class ExtractPipeline:
    def __init__(self, ex: Extractor) -> None:
        self.ex = ex
        self._q: queue.Queue[list[Any] | None] = queue.Queue(maxsize=QUEUE_BATCHES)
        self._batch: list[Any] = []  # flat: ("b", member) | ("d", bytes) | ("e", None)
        self._bytes = 0
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._run, name="extract", daemon=True)
        self._t.start()

    def _run(self) -> None:
        ex = self.ex
        while (batch := self._q.get()) is not None:
            if self.error is not None:
                continue  # keep draining so the producer never blocks
            try:
                for op, arg in batch:
                    if op == "d":
                        ex.data(arg)
                    elif op == "b":
                        ex.begin(arg)
                    else:
                        ex.end()
            except BaseException as e:  # re-raised in the main thread
                self.error = e

    def _flush(self) -> None:
        if self.error is not None:
            raise self.error
        if self._batch:
            self._q.put(self._batch)
            self._batch = []
            self._bytes = 0

    def begin(self, m: Member) -> None:
        self._batch.append(("b", m))
        if len(self._batch) >= BATCH_ITEMS:
            self._flush()

    def data(self, mv: memoryview) -> None:
        self._batch.append(("d", mv))
        self._bytes += len(mv)
        if self._bytes >= BATCH_BYTES:
            self._flush()

    def end(self) -> None:
        self._batch.append(("e", None))

    def finish(self) -> None:
        """Wait until everything is on disk; raise the worker's error if there was one."""
        self._flush()
        self._q.put(None)
        self._t.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop the worker after an error in the main thread (idempotent)."""
        if self._t.is_alive():
            self._batch = []
            self.error = self.error or RuntimeError("aborted")
            self._q.put(None)
            self._t.join()
