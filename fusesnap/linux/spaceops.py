"""fallocate(2) and lseek(SEEK_DATA/SEEK_HOLE) on the host file behind a file.

fallocate acts on the upper file (a write access copies the file up first),
lseek on whichever file serves reads (lower until copy-up). The host file
system's answer (space allocated, holes it keeps, ENXIO, EOPNOTSUPP) is what
the caller sees — as with kernel overlayfs. These need the patched pyfuse3
(third_party/pyfuse3) that passes the two requests on.
"""

from __future__ import annotations

import errno
import os

from fusesnap.linux import libc


# Kernel FUSE forwards only these modes (others fail with EOPNOTSUPP before us);
# the host call gets whatever the kernel sent.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Apply fallocate to the upper file behind fd (the caller copied it up)."""
    try:
        libc.fallocate(fd, mode, offset, length)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            # ENOSYS would make the kernel disable fallocate for the whole mount
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP)) from None
        raise


def lseek(fd: int, offset: int, whence: int) -> int:
    """Next data (SEEK_DATA) or hole (SEEK_HOLE) at or after offset in fd's host file.

    ENXIO when offset is at/after EOF, or no data follows it (SEEK_DATA), exactly as
    the host reports it. The host fd's own position is irrelevant (reads and writes
    use pread/pwrite); the kernel keeps the caller's position from our answer.
    """
    if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    return os.lseek(fd, offset, whence)
