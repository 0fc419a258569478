"""A process's command line as ps(1) and /proc/PID/cmdline show it, rewritten in place.

A daemon forked by the mount server (cli/mountserver.py) would otherwise show
the server's command line; users, scripts and tests find a mount's daemon by
the mount point in its arguments. The kernel reads /proc/PID/cmdline from the
process's own memory between arg_start and arg_end (/proc/PID/stat), so the
new arguments are written there, NUL-separated, the rest zeroed. The space is
what the process was started with: the server reserves it with a padding
argument. Longer titles are cut (the last byte stays NUL, which keeps the
kernel reading them as separate arguments).
"""

from __future__ import annotations

import ctypes
import os

_PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


_area: tuple[int, int] | None = None     # read once: a forked child keeps its parent's


def _argv_area() -> tuple[int, int]:
    global _area
    if _area is None:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # fields 48 and 49 of proc(5), counted from field 3 (the state) here
        _area = int(fields[45]), int(fields[46])
    return _area


def set_title(args: list[bytes] | list[str], name: str | None = None) -> None:
    """Show args as this process's command line, and name (default: the first
    argument's base name) as its comm, what `ps -o comm` and pgrep show."""
    raw = [os.fsencode(a) for a in args]
    start, end = _argv_area()
    size = end - start
    if size <= 1 or not raw:
        return
    data = b"\0".join(raw)[:size - 1]
    ctypes.memmove(start, data.ljust(size, b"\0"), size)
    comm = os.fsencode(name) if name is not None else os.path.basename(raw[0])
    _libc.prctl(_PR_SET_NAME, ctypes.c_char_p(comm[:15]), 0, 0, 0)
