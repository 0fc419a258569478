"""Host paths longer than PATH_MAX: reach them through /proc/self/fd of a parent dir.

Deep trees (a cwd inside the mount near PATH_MAX, then more) give upper and
lower paths the kernel refuses (ENAMETOOLONG). `short(path)` returns an
equivalent path below PATH_MAX: `/proc/self/fd/N/rest`, N an O_PATH fd of a
parent directory. Fds are cached and dropped whenever directories move.
"""

from __future__ import annotations

import os

LIMIT = 3000


class ShortPaths:
    def __init__(self) -> None:
        self.cache: dict[bytes, int] = {}

    def __call__(self, path: bytes) -> bytes:
        if len(path) < LIMIT:
            return path
        k = path.find(b"/", len(path) - LIMIT + 1)
        if k <= 0:
            return path          # one name longer than LIMIT: let the syscall fail
        prefix = path[:k]
        fd = self.cache.get(prefix)
        if fd is None:
            if len(self.cache) >= 64:
                self.invalidate()
            fd = os.open(self(prefix), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self.cache[prefix] = fd
        return b"/proc/self/fd/%d%s" % (fd, path[k:])

    def invalidate(self) -> None:
        for fd in self.cache.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.cache.clear()


short = ShortPaths()
