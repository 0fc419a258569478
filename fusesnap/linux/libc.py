"""The libc calls Python's os module lacks, through ctypes, in one place.

Each wrapper raises OSError with the call's errno, like the os module does.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def _raise(path: bytes | str | None = None) -> None:
    e = ctypes.get_errno()
    if path is None:
        raise OSError(e, os.strerror(e))
    raise OSError(e, os.strerror(e), path)


def renameat2(old: bytes, new: bytes, flags: int) -> None:
    """rename(2) with RENAME_NOREPLACE / RENAME_EXCHANGE."""
    if _libc.renameat2(AT_FDCWD, old, AT_FDCWD, new, ctypes.c_uint(flags)) != 0:
        _raise()


def link_fd(fd: int, dest: bytes) -> None:
    """Give an open file (an O_TMPFILE) a name: linkat of /proc/self/fd/N, AT_SYMLINK_FOLLOW."""
    if _libc.linkat(AT_FDCWD, b"/proc/self/fd/%d" % fd, AT_FDCWD, dest, AT_SYMLINK_FOLLOW) != 0:
        _raise(dest)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (os.posix_fallocate has none)."""
    if _fallocate(fd, mode, offset, length) != 0:
        _raise()


def mount(source: str, target: str | bytes, fstype: str, flags: int, data: str) -> None:
    """mount(2) (needs CAP_SYS_ADMIN in the user namespace owning the mount namespace)."""
    if _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), ctypes.c_ulong(flags),
                   data.encode()) != 0:
        _raise(target)


def umount2(path: bytes | str, flags: int = 0) -> None:
    """umount2(2): what `umount` runs, without starting a program (needs CAP_SYS_ADMIN
    in the mount's user namespace)."""
    if _libc.umount2(os.fsencode(path), ctypes.c_int(flags)) != 0:
        _raise(path)


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding fd."""
    if _libc.syncfs(fd) != 0:
        _raise()
