"""Read ahead the lower directories a caller is about to list (fusesnap-overlay over cold caches).

A fresh `fusesnap-overlay` mount merges each lower directory the first time
it is used (fs/core/lazytree.py): scandir and an lstat of every entry, in every
layer. On cold caches those are disk reads, made one directory at a time while
the caller waits, and then Python's own work on the entries, one after the
other. Whoever lists a directory (a walk, `find`, `du`, a container's start
reading /usr/lib) tends to look into its subdirectories next, so once a
directory is merged this thread reads its subdirectories' host directories and
inodes into the kernel's caches, while the request loop goes on: the disk
works during Python's part. It only reads: nothing it does is visible to the
union, so it needs no lock. Most recently merged first, the way a depth-first
walk proceeds.
"""

from __future__ import annotations

import os
import threading

from fusesnap.fs.core.longpath import LIMIT


class DirWarmer:
    """Callable with a list of host directories to read ahead."""

    def __init__(self) -> None:
        self._batches: list[list[bytes]] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def __call__(self, hostdirs: list[bytes]) -> None:
        hostdirs = [d for d in hostdirs if len(d) < LIMIT]
        if not hostdirs:
            return
        with self._cond:
            self._batches.append(hostdirs)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fusesnap-dir-warmer", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._batches:
                    self._cond.wait()
                batch = self._batches.pop()
            for d in batch:
                _read_dir(d)


def _read_dir(path: bytes) -> None:
    try:
        with os.scandir(path) as it:
            for e in it:
                try:
                    e.stat(follow_symlinks=False)
                except OSError:
                    pass
    except OSError:
        pass
