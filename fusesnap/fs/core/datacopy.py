"""Copying file content from a lower into the upper: reflink first, then in-kernel copies.

Only the data extents of the lower file are copied (SEEK_DATA/SEEK_HOLE), so a
sparse lower file stays sparse in the upper, as kernel overlayfs keeps it. Each
extent is one in-kernel copy call (sendfile moves at most MAX_CALL per call),
as fuse-overlayfs does (chunk sizes and copy_file_range measured no faster:
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Callable, Iterator

FICLONE = 0x40049409
MAX_CALL = 0x7FFFF000    # the most sendfile/copy_file_range move in one call (Linux MAX_RW_COUNT)
FALLBACK = 1 << 20       # read/write buffer when no in-kernel copy works

# errors that mean "this way of copying does not work here", not "the copy failed"
_UNSUPPORTED = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EIO)


def copy_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy the first size bytes of src_fd into the empty dst_fd without passing through Python.

    FICLONE shares the blocks (btrfs, xfs); otherwise every data extent is
    copied by sendfile(2) (works across filesystems), with copy_file_range and
    read/write as fallbacks. Holes are left as holes; the result has the size
    of the source (at most size)."""
    if size == 0:
        return
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return
    except OSError:
        pass
    end = min(size, os.fstat(src_fd).st_size)
    for start, stop in data_extents(src_fd, end):
        _copy_range(src_fd, dst_fd, start, stop)
    if os.fstat(dst_fd).st_size < end:
        os.ftruncate(dst_fd, end)      # the file ends in a hole


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the data regions of fd below size; all of it where holes are unknown."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:          # only a hole is left
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield off, size                 # no SEEK_DATA here: treat it all as data
                return
            raise
        if start >= size:
            return
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        if stop <= start:                       # raced with a change of the file: copy the rest
            stop = size
        yield start, stop
        off = stop


def _copy_range(src: int, dst: int, off: int, end: int) -> None:
    """Copy bytes [off, end) of src to the same offsets of dst."""
    for step in _STEPS:
        try:
            while off < end:
                n = step(src, dst, off, min(end - off, MAX_CALL))
                if n == 0:
                    break
                off += n
            if off >= end:
                return
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
    while off < end:
        buf = os.pread(src, min(end - off, FALLBACK), off)
        if not buf:
            break
        os.pwrite(dst, buf, off)
        off += len(buf)


def _sendfile(src: int, dst: int, off: int, n: int) -> int:
    os.lseek(dst, off, os.SEEK_SET)
    return os.sendfile(dst, src, off, n)


def _copy_file_range(src: int, dst: int, off: int, n: int) -> int:
    return os.copy_file_range(src, dst, n, off, off)


_STEPS: tuple[Callable[[int, int, int, int], int], ...] = (_sendfile, _copy_file_range)
