"""What the process behind a request is doing: the system call it waits in.

With zero-message opens an open(O_TRUNC) reaches the daemon as a bare size
SETATTR, exactly like truncate(2) to the same size; the kernel strips the
times from both, expecting the server to mark them. They differ only when the
size does not change: open(O_TRUNC) marks mtime/ctime anyway, truncate(2)
does not. The caller is blocked in its system call while we answer, so
/proc/PID/syscall tells the two apart.
"""

from __future__ import annotations

import platform

# open, creat, openat, openat2 per architecture (asm/unistd_64.h, asm-generic/unistd.h)
_OPEN_SYSCALLS: dict[str, frozenset[int]] = {
    "x86_64": frozenset({2, 85, 257, 437}),
    "aarch64": frozenset({56, 437}),
    "riscv64": frozenset({56, 437}),
}
_OPENS = _OPEN_SYSCALLS.get(platform.machine())


def in_open(pid: int) -> bool | None:
    """True if pid waits in an open-type call, False if in another one, None if unknown."""
    if _OPENS is None or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/syscall", "rb") as f:
            nr = f.read(24).split(b" ", 1)[0]
    except OSError:
        return None
    if not nr.isdigit():            # "running", or "-1" for no system call
        return None
    return int(nr) in _OPENS
