"""The writable upper directory on the host: where each object lives in it, and the
markers of the shared overlay format (fs/core/upperformat.py) it writes.

Paths are built from an inode's names on every call (names change with
renames); regular files the daemon keeps an fd for are reached through the fd.
"""

from __future__ import annotations

import errno
import os
import stat as S

from fusesnap.fs.core import upperformat
from fusesnap.fs.core.attrs import ROOT_INO
from fusesnap.fs.core.errs import err
from fusesnap.fs.core.filefds import FileFds
from fusesnap.fs.core.inodes import Inode
from fusesnap.fs.core.longpath import short


class UpperDir:
    __slots__ = ("root", "work", "files", "readonly", "euid", "can_mknod", "tmp_counter")

    def __init__(self, root: bytes | None, work: bytes | None, files: FileFds, readonly: bool) -> None:
        self.root = root              # None: a read-only view without an upper
        self.work = work
        self.files = files
        self.readonly = readonly
        self.euid = os.geteuid()
        self.can_mknod = True         # 0/0 char device whiteouts until mknod is refused
        self.tmp_counter = 0

    def writable(self) -> None:
        """Raise EROFS unless the view may change."""
        if self.readonly:
            raise err(errno.EROFS)

    # ------------------------------------------------------------ where objects live
    def path(self, i: Inode) -> bytes:
        p = i.path()
        return self.root if p == b"." else short(self.root + b"/" + p)

    def child(self, d: Inode, name: bytes) -> bytes:
        p = d.path()
        return short(self.root + b"/" + name if p == b"." else self.root + b"/" + p + b"/" + name)

    def name_path(self, i: Inode) -> bytes | None:
        """The path of an object that still has a name, else None."""
        return self.path(i) if (i.parent is not None or i.ino == ROOT_INO) else None

    def target(self, i: Inode) -> int | bytes:
        """An upper object's host inode for metadata calls: the file's kept fd when there
        is one (no path to build and walk: a file being written is stat'ed, chowned and
        timestamped through it), else its path; ENOENT for a nameless one without."""
        if i.kind == S.S_IFREG:
            fd = self.files.kept(i.ino)
            if fd is not None:
                return fd
        if i.parent is None and i.ino != ROOT_INO:
            raise err(errno.ENOENT)
        return self.path(i)

    # ------------------------------------------------------------ markers
    def set_opaque(self, path: bytes) -> None:
        names = (b"trusted.overlay.opaque",) if self.euid == 0 else ()
        names += (b"user.fuseoverlayfs.opaque",)
        for n in names:
            try:
                os.setxattr(path, n, b"y", follow_symlinks=False)
                return
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    raise
        fd = os.open(path + b"/" + upperformat.OPQ_NAME, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def drop_whiteouts(self, i: Inode, path: bytes) -> None:
        """An opaque dir needs no whiteouts, and kernel overlayfs lists them in one."""
        if not i.wh:
            return
        times = dir_times(path)      # dropping hidden markers changes nothing visible
        for name in i.wh:
            for p in (path + b"/" + name, path + b"/.wh." + name):
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                if not S.S_ISDIR(st.st_mode):
                    os.unlink(p)
        i.wh = None
        restore_times(path, times)

    def whiteout(self, d: Inode, name: bytes) -> None:
        """Hide NAME of the lowers below directory d (d must be in the upper)."""
        path = self.child(d, name)
        if self.can_mknod:
            try:
                os.mknod(path, S.S_IFCHR | 0o600, 0)
                note_whiteout(d, name)
                return
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EACCES, errno.ENOTSUP):
                    raise
                self.can_mknod = False
        fd = os.open(self.child(d, b".wh." + name), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        note_whiteout(d, name)

    def clear_whiteout(self, d: Inode, name: bytes) -> bool:
        """Remove an upper whiteout for NAME in d; True if there was one."""
        if not d.wh or name not in d.wh:
            return False
        d.wh.discard(name)
        for p in (self.child(d, name), self.child(d, b".wh." + name)):
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if S.S_ISDIR(st.st_mode):
                continue
            os.unlink(p)
        return True

    # ------------------------------------------------------------ host objects
    def rm_tree(self, path: bytes) -> None:
        """Remove an upper directory that holds only whiteouts/markers."""
        self.empty_dir(path)
        os.rmdir(path)

    def empty_dir(self, path: bytes) -> None:
        """Drop the hidden whiteouts of a directory about to be renamed over."""
        with os.scandir(path) as it:
            for de in it:
                if de.is_dir(follow_symlinks=False):
                    self.rm_tree(short(de.path))
                else:
                    os.unlink(de.path)

    def tmpfile(self, d: Inode) -> tuple[int, bytes | None]:
        """A new unnamed (O_TMPFILE) or hidden temporary file in d's upper directory."""
        dirpath = self.path(d)
        try:
            fd = os.open(dirpath, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            return fd, None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
        base = self.work if self.work is not None else dirpath
        while True:
            self.tmp_counter += 1
            tmp = base + b"/.wh.fusesnap-tmp-%d-%d" % (os.getpid(), self.tmp_counter)
            try:
                return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
            except FileExistsError:
                continue


def note_whiteout(d: Inode, name: bytes) -> None:
    if d.wh is None:
        d.wh = set()
    d.wh.add(name)


def dir_times(path: bytes) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_atime_ns, st.st_mtime_ns


def restore_times(path: bytes, t: tuple[int, int]) -> None:
    """Copy-up is no change of the parent: keep its times (as kernel overlayfs does)."""
    os.utime(path, ns=t, follow_symlinks=False)
