"""Host fds behind regular files: one per object, shared by every open of it.

The kernel opens files without asking the daemon (zero-message open, pyfuse3
patch 0005), so READ/WRITE arrive with an inode, not a handle: the daemon keeps
one host fd per object instead of one per open(2). Lower files never change;
upper files change only through this daemon; so a cached fd is always the
current content. The cache is capped (oldest closed first), except for upper
files that lost their last name while the kernel may still have them open:
their data is reachable only through the fd kept here.
"""

from __future__ import annotations

import errno
import os
import resource

from fusesnap.fs.core.longpath import short

_READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.ETXTBSY, errno.EROFS)


def fd_cap() -> int:
    """How many fds each cache of FileFds keeps: a quarter of the (raised) RLIMIT_NOFILE, at most 16384."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 1 << 16) if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return max(64, min(16384, soft // 4))


class FileFds:
    def __init__(self, cap: int, read_only: bool) -> None:
        self.cap = cap
        self.read_only = read_only
        self.lower: dict[int, int] = {}                 # lower object ino -> O_RDONLY fd
        self.upper: dict[int, tuple[int, bool]] = {}    # inode number -> (fd, writable)
        self.pinned: set[int] = set()                   # inodes whose upper file has no name

    def lower_fd(self, key: int, path: bytes) -> int:
        fd = self.lower.get(key)
        if fd is None:
            fd = os.open(short(path), os.O_RDONLY | os.O_CLOEXEC)
            if len(self.lower) >= self.cap:
                self._evict_lower()
            self.lower[key] = fd
        return fd

    def cached(self, ino: int, write: bool) -> int | None:
        """The kept fd of ino's upper file if it serves this access: the per-request
        path, without building the file's path."""
        e = self.upper.get(ino)
        return e[0] if e is not None and (e[1] or not write) else None

    def upper_fd(self, ino: int, path: bytes | None, write: bool) -> int:
        """The upper file's fd, writable if asked; path None: reopen the kept fd.

        Read access opens O_RDWR where the host allows it, so a later write needs
        no second open; a file the daemon may only read gets O_RDONLY."""
        fd = self.cached(ino, write)
        if fd is not None:
            return fd
        e = self.upper.get(ino)
        if path is None:
            if e is None:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
            path, nofollow = b"/proc/self/fd/%d" % e[0], 0
        else:
            nofollow = os.O_NOFOLLOW
        base = os.O_CLOEXEC | nofollow
        writable = False
        if not self.read_only:
            try:
                fd = os.open(path, base | os.O_RDWR)
                writable = True
            except OSError as err:
                if write or err.errno not in _READ_ONLY_ERRNOS:
                    raise
        elif write:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        if not writable:
            fd = os.open(path, base | os.O_RDONLY)
        self.put_upper(ino, fd, writable)
        return fd

    def put_upper(self, ino: int, fd: int, writable: bool) -> None:
        old = self.upper.pop(ino, None)
        if old is not None:
            os.close(old[0])
        elif len(self.upper) >= self.cap:
            self._evict_upper()
        self.upper[ino] = (fd, writable)

    def pin(self, ino: int, path: bytes) -> None:
        """Keep ino's upper file reachable: its last name is about to go."""
        self.upper_fd(ino, path, False)
        self.pinned.add(ino)

    def adopt(self, ino: int, fd: int) -> None:
        """Keep fd (writable) as ino's upper file, which has no name."""
        self.put_upper(ino, fd, True)
        self.pinned.add(ino)

    def kept(self, ino: int) -> int | None:
        e = self.upper.get(ino)
        return e[0] if e is not None else None

    def drop(self, ino: int) -> None:
        e = self.upper.pop(ino, None)
        self.pinned.discard(ino)
        if e is not None:
            os.close(e[0])

    def _evict_lower(self) -> None:
        for key in list(self.lower)[: max(1, len(self.lower) // 2)]:
            os.close(self.lower.pop(key))

    def _evict_upper(self) -> None:
        drop = len(self.upper) // 2
        for ino in list(self.upper):
            if drop <= 0:
                break
            if ino not in self.pinned:
                os.close(self.upper.pop(ino)[0])
                drop -= 1
