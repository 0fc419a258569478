"""A blob download that a layer import can read while it is still arriving.

The downloading thread writes the partial file and reports each chunk; a
FollowingReader returns what has been written and waits for more, and gives
end-of-file only once the download finished and its digest was verified (a
failed download raises in the reader instead). A layer import reads to
end-of-file before it commits, so it never commits an unverified blob, while
decompressing and extracting overlap the transfer instead of following it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ..errors import FusesnapError


class Download:
    def __init__(self, partial: Path) -> None:
        self.path = partial          # where the bytes are (the final name once complete)
        self.size = 0
        self.done = False
        self.error: BaseException | None = None
        self.restarted = False
        self.cond = threading.Condition()

    def grow(self, n: int) -> None:
        with self.cond:
            if n < 0:               # the server ignored a Range request: the file starts over
                self.restarted = True
            self.size += n
            self.cond.notify_all()

    def complete(self, final: Path, rename: bool = True, size: int | None = None) -> None:
        """The blob is whole and verified at `final` (renamed there now unless it already was).
        Under the lock: a reader never opens the partial name after it is gone."""
        with self.cond:
            if rename:
                os.rename(self.path, final)
            self.path = final
            if size is not None:
                self.size = size
            self.done = True
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.cond:
            self.done, self.error = True, error
            self.cond.notify_all()


class FollowingReader:
    def __init__(self, dl: Download, what: str) -> None:
        self.dl, self.what = dl, what
        self.pos = 0
        self.f = None

    def read(self, n: int = -1) -> bytes:
        dl = self.dl
        with dl.cond:
            while self.pos >= dl.size and not dl.done:
                dl.cond.wait()
            if dl.error is not None:
                raise type(dl.error)(str(dl.error)) if isinstance(dl.error, FusesnapError) else \
                    FusesnapError(f"download of {self.what} failed: {dl.error}")
            if dl.restarted:
                raise FusesnapError(f"the download of {self.what} started over; run the pull again")
            avail = dl.size - self.pos
            if avail <= 0:
                return b""
            if self.f is None:
                self.f = open(dl.path, "rb")
        b = self.f.read(avail if n < 0 else min(n, avail))
        self.pos += len(b)
        return b

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
