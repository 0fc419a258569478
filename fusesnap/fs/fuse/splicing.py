"""How big a READ reply libfuse can splice (pyfuse3 patch 0009).

`Operations.read` answers with the host file's descriptor and libfuse splices
the data through a pipe into /dev/fuse: no copy through the daemon. The pipe
must hold the whole reply: libfuse grows it with F_SETPIPE_SZ to three pages
plus the reply, which above /proc/sys/fs/pipe-max-size (1 MiB by default)
needs CAP_SYS_RESOURCE; without it libfuse falls back to a fresh buffer mapped
and unmapped per request, slower than a plain pread. So a reply that would not
fit is read into memory by the daemon instead, and the mount's read-ahead
(which sizes the kernel's READs) is kept to what fits.
"""

from __future__ import annotations

import os

from fusesnap.linux.callers import cap_in_status

PAGE = os.sysconf("SC_PAGE_SIZE")
CAP_SYS_RESOURCE = 24
_HEADER = 16            # struct fuse_out_header


def max_spliced_read(status: str = "/proc/self/status",
                     pipe_max: str = "/proc/sys/fs/pipe-max-size") -> int | None:
    """The largest READ libfuse can splice here, or None for no limit."""
    if cap_in_status(status, CAP_SYS_RESOURCE):
        return None
    try:
        with open(pipe_max) as f:
            limit = int(f.read())
    except (OSError, ValueError):
        limit = 1 << 20
    return limit - 3 * PAGE - _HEADER


def read_ahead_that_splices(kb: int, limit: int | None) -> int:
    """kb, lowered to whole pages that fit `limit` bytes (a READ is at most the
    read-ahead); None or a negative limit (reads not spliced): kb."""
    if limit is None or limit < 0 or kb * 1024 <= limit:
        return kb
    return max(PAGE, limit // PAGE * PAGE) // 1024
