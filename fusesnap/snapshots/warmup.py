"""Warm-up: read a record's files into the page cache before a workload asks for them.

What is read is the layer files a store mount serves (layers/<hex>/fs/...),
not paths under a mount: a mount answers a cold read with the host file's
pages (spliced into /dev/fuse), so once those are cached the workload's reads
cost no disk I/O. Reading the layer files needs no live mount (an image or a
snapshot can be warmed before its container starts, or while it mounts),
sends the daemon no request, and does not land in the record of a recorded
mount. Each path is resolved in the target's merged tree, so a record made on
one build of an image warms another (an optimized one) by path.

Files are read whole, in recorded order, by `jobs` threads (bounded
parallelism: the disk gets a few requests at once, the earliest first).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .accessrecord import RecordEntry, first_accesses
from .recorder import ChainView, RecordError

log = logging.getLogger(__name__)

BUF = 1 << 20


@dataclass
class WarmResult:
    files: int = 0              # files read
    bytes: int = 0
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)    # recorded paths the target does not serve

    def to_json(self) -> dict[str, object]:
        return {"files": self.files, "bytes": self.bytes, "seconds": round(self.seconds, 6),
                "missing": len(self.missing), "missing_paths": self.missing}


class _Reader:
    """Reads whole files through one buffer per thread; returns the bytes read."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __call__(self, src: bytes) -> int:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = memoryview(bytearray(BUF))
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:      # the layer went away meanwhile (rm, gc): nothing to warm
            log.info("warm: cannot open %s: %s", os.fsdecode(src), e.strerror)
            return -1
        total = 0
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
        return total


def plan(view: ChainView, entries: Sequence[RecordEntry]) -> tuple[list[tuple[bytes, str]], list[str]]:
    """The host files to read with the paths they serve, in recorded order (each once), and
    the recorded paths the view does not serve."""
    files: list[tuple[bytes, str]] = []
    seen: set[bytes] = set()
    missing: list[str] = []
    for e in first_accesses(entries):
        try:
            src = view.resolve(e.path).src
        except RecordError:
            missing.append(e.path)
            continue
        if src not in seen:         # hard links: one file
            seen.add(src)
            files.append((src, e.path))
    return files, missing


def warm(view: ChainView, entries: Sequence[RecordEntry], jobs: int = 4,
         progress: Callable[[int], None] | None = None) -> WarmResult:
    """Read the files of `entries` that `view` serves into the page cache."""
    t0 = time.monotonic()
    files, missing = plan(view, entries)
    res = WarmResult(missing=missing)
    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="warm") as pool:
        # submitted in order, `jobs` at a time
        for (_, path), n in zip(files, pool.map(_Reader(), [src for src, _ in files])):
            if n < 0:
                res.missing.append(path)
                continue
            res.files += 1
            res.bytes += n
            if progress is not None:
                progress(n)
    res.seconds = time.monotonic() - t0
    return res
