"""What the process behind a request is doing: the system call it waits in.

With zero-message opens an open(O_TRUNC) reaches the daemon as a bare size
SETATTR, exactly like truncate(2) to the same size; the kernel strips the
times from both, expecting the server to mark them. They differ only when the
size does not change: open(O_TRUNC) marks mtime/ctime anyway, truncate(2)
does not. The caller is blocked in its system call while we answer, so
/proc/PID/syscall tells the two apart. (The same for chown, see in_chown.)
"""

from __future__ import annotations

import platform

# per architecture (asm/unistd_64.h, asm-generic/unistd.h): open, creat, openat, openat2
_OPEN_SYSCALLS: dict[str, frozenset[int]] = {
    "x86_64": frozenset({2, 85, 257, 437}),
    "aarch64": frozenset({56, 437}),
    "riscv64": frozenset({56, 437}),
}
# chown, fchown, lchown, fchownat
_CHOWN_SYSCALLS: dict[str, frozenset[int]] = {
    "x86_64": frozenset({92, 93, 94, 260}),
    "aarch64": frozenset({54, 55}),
    "riscv64": frozenset({54, 55}),
}
_OPENS = _OPEN_SYSCALLS.get(platform.machine())
_CHOWNS = _CHOWN_SYSCALLS.get(platform.machine())


def _in(pid: int, calls: frozenset[int] | None) -> bool | None:
    if calls is None or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/syscall", "rb") as f:
            nr = f.read(24).split(b" ", 1)[0]
    except OSError:
        return None
    if not nr.isdigit():            # "running", or "-1" for no system call
        return None
    return int(nr) in calls


def in_open(pid: int) -> bool | None:
    """True if pid waits in an open-type call, False if in another one, None if unknown."""
    return _in(pid, _OPENS)


def in_chown(pid: int) -> bool | None:
    """True if pid waits in a chown-type call, False if in another one, None if unknown.

    Under FUSE_HANDLE_KILLPRIV_V2 chown(f, -1, -1) reaches the daemon as a SETATTR
    of nothing, which must still drop setuid; so does the kernel's own removal of
    security.capability before a write, which must not."""
    return _in(pid, _CHOWNS)


CAP_FOWNER = 3
CAP_FSETID = 4


def has_cap(pid: int, cap: int) -> bool | None:
    """Whether pid holds capability cap, None if unknown. Capabilities held inside a
    user namespace count, as capable_wrt_inode_uidgid() counts them for inodes
    that namespace maps."""
    if pid <= 0:
        return None
    return cap_in_status(f"/proc/{pid}/status", cap)


def cap_in_status(status: str, cap: int) -> bool | None:
    """Whether the CapEff line of a /proc/PID/status file has cap, None if unreadable."""
    try:
        with open(status, "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        return None
    return None
