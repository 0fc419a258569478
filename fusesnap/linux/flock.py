"""flock(2) on a lock file, and who holds one (from /proc/locks).

A FUSE daemon holds such a lock for as long as it serves, so that other
commands can tell a live mount from a dead one without reading any mount
table: a mount made in another mount namespace is invisible in ours, its
daemon's lock is not.
"""

from __future__ import annotations

import fcntl
import os


def hold(path: str | os.PathLike, shared: bool = False) -> int | None:
    """Open path (created 0600 if missing) and flock it without waiting.

    Returns the descriptor (close-on-exec), which keeps the lock until it is
    closed or the process exits; None when a conflicting lock is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def holders(path: str | os.PathLike) -> list[int]:
    """Pids of the processes holding a flock on path's file (as /proc/locks names
    them: the process that took the lock)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        f = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:00:5678 0 EOF"; blocked waiters carry "->"
        if len(f) >= 6 and f[1] == "FLOCK" and f[5] == want and f[4].isdigit():
            pids.append(int(f[4]))
    return pids
