"""A blob download that a layer import can read while it is still arriving.

The downloading thread writes the partial file and reports each chunk; a
FollowingReader returns what has been written and waits for more, and gives
end-of-file only once the download finished and its digest was verified (a
failed download raises in the reader instead). A layer import reads to
end-of-file before it commits, so it never commits an unverified blob, while
decompressing and extracting overlap the transfer instead of following it.
"""

from __future__ import annotations

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

    def finish(self, final: Path | None = None, error: BaseException | None = None) -> None:
        with self.cond:
            if final is not None:
                self.path = final
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
