"""File contents: the host fd behind each read and write, open(2) when the kernel passes
it on, and symlink targets.

Lower files never change: one read-only fd per lower object serves every
reader. Upper files change only through this daemon: one fd per object
(fs/core/filefds.py), O_RDWR where the host allows it.
"""

from __future__ import annotations

import errno
import os
import stat as S

from fusesnap.fs.core.copyup import CopyUp
from fusesnap.fs.core.errs import err
from fusesnap.fs.core.filefds import FileFds
from fusesnap.fs.core.inodes import Inode
from fusesnap.fs.core.ownership import Ownership
from fusesnap.fs.core.upperdir import UpperDir


class FileIO:
    __slots__ = ("upper", "files", "copyup", "owners")

    def __init__(self, upper: UpperDir, files: FileFds, copyup: CopyUp, owners: Ownership) -> None:
        self.upper = upper
        self.files = files
        self.copyup = copyup
        self.owners = owners

    def read_fd(self, i: Inode) -> int:
        if i.upper:
            return self._upper_fd(i, False)
        return self.files.lower_fd(i.lower.ino, i.lower.src)

    def write_fd(self, i: Inode) -> int:
        """The upper file's writable fd; the caller has copied i up."""
        return self._upper_fd(i, True)

    def _upper_fd(self, i: Inode, write: bool) -> int:
        # every READ/WRITE comes here: build the path only when no kept fd serves
        fd = self.files.cached(i.ino, write)
        return fd if fd is not None else self.files.upper_fd(i.ino, self.upper.name_path(i), write)

    def open(self, i: Inode, flags: int, caller_uid: int = 0) -> int:
        """An open(2) the kernel passed on (mounts without zero-message opens): copies
        up for write access and applies O_TRUNC (atomic_o_trunc). Access was checked
        by the kernel, or is root's (fs/core/permissions.py). Returns the fd that
        serves the file from now on."""
        write = flags & os.O_ACCMODE != os.O_RDONLY
        if write or flags & os.O_TRUNC:
            self.upper.writable()
            if not i.upper:
                self.copyup.copy_up(i, data=not (flags & os.O_TRUNC))
        if not i.upper:
            return self.read_fd(i)
        fd = self.write_fd(i) if write or flags & os.O_TRUNC else self.read_fd(i)
        if flags & os.O_TRUNC and i.kind == S.S_IFREG:
            os.ftruncate(fd, 0)
            i.attr = None
            if caller_uid != 0:
                # open(O_TRUNC) reaches us instead of a size setattr (atomic_o_trunc):
                # kill the privileges the kernel would have killed for that caller
                self.owners.kill_suidgid(i)
        return fd

    def write(self, i: Inode, off: int, buf: bytes, kill_suidgid: bool = False) -> int:
        """WRITE to an upper file (the caller copied it up)."""
        if kill_suidgid:
            self.owners.kill_suidgid(i)
        fd = self.write_fd(i)
        n = os.pwrite(fd, buf, off)
        t = i.kernel_times
        if t is not None:
            # The kernel owns mtime under the writeback cache and sends it as a SETATTR,
            # which may overtake the last cached pages: the host's own update is undone.
            # (Pages written back before that SETATTR need nothing: it follows them.)
            os.utime(fd, ns=t)
        return n

    def fsync(self, i: Inode, datasync: bool) -> None:
        if not i.upper:
            return
        fd = self.read_fd(i)
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    def fsync_dir(self, i: Inode) -> None:
        if not i.upper:
            return
        fd = os.open(self.upper.path(i), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def readlink(self, i: Inode) -> bytes:
        if i.kind != S.S_IFLNK:
            raise err(errno.EINVAL)
        if not i.upper:
            return i.lower.target
        return os.readlink(self.upper.path(i))
