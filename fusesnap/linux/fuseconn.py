"""A FUSE connection mounted with mount(2) by one process and served by another.

libfuse mounts as root the same way: open /dev/fuse, mount(2) with `fd=N` in
the data, and the kernel queues every request on that connection until the
daemon answers INIT. A process that may mount (root, or root of the user
namespace owning its mount namespace) can therefore make the mount in well
under a millisecond and hand the descriptor to whatever serves it later.
libfuse's convention for such a descriptor is the mountpoint `/dev/fd/N`
(mount.fuse3 -o drop_privileges passes it that way); `fusesnap mount` takes it
too. Only the options libfuse itself turns into mount(2) arguments are known
here; anything else raises ValueError, so that the caller mounts the ordinary
way instead of silently dropping an option.
"""

from __future__ import annotations

import os
import stat

from . import libc, mountinfo

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_DIRSYNC, MS_NOATIME, MS_NODIRATIME, MS_LAZYTIME = 128, 1024, 2048, 1 << 25

# option -> (flag set by it, flag cleared by it), as libfuse's mount.c maps them
_FLAGS = {
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "lazytime": (MS_LAZYTIME, 0), "nolazytime": (0, MS_LAZYTIME),
    "dirsync": (MS_DIRSYNC, 0),
}
_KERNEL_FLAGS = {"default_permissions", "allow_other"}
_KERNEL_VALUES = {"max_read", "blksize"}


def connection_fd(mountpoint: str | os.PathLike) -> int | None:
    """N for a mountpoint spelled `/dev/fd/N` (libfuse's already-mounted connection), else None."""
    path = os.fspath(mountpoint)
    n = path[8:] if isinstance(path, str) and path.startswith("/dev/fd/") else ""
    return int(n) if n.isascii() and n.isdigit() else None


def is_connection(fd: int) -> bool:
    """Whether fd is an open /dev/fuse descriptor."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 10 and os.minor(st.st_rdev) == 229


def mount_args(options: set[str] | list[str]) -> tuple[str, str, int, str]:
    """(source, fstype, flags, data without fd/rootmode/ids) for libfuse-style options."""
    source, subtype, flags = "", "", 0
    data: list[str] = []
    for opt in sorted(options):
        key, eq, val = opt.partition("=")
        if key == "fsname" and eq:
            source = val
        elif key == "subtype" and eq:
            subtype = val
        elif opt in _FLAGS:
            on, off = _FLAGS[opt]
            flags = (flags | on) & ~off
        elif opt in _KERNEL_FLAGS:
            data.append(opt)
        elif key in _KERNEL_VALUES and eq and val.isdigit():
            data.append(opt)
        else:
            raise ValueError(f"option {opt!r} is not one mount(2) takes directly")
    if "," in source or "," in subtype:
        raise ValueError("a comma in fsname or subtype")
    return source or subtype or "fuse", f"fuse.{subtype}" if subtype else "fuse", flags, ",".join(data)


def mount(mountpoint: str, options: set[str] | list[str]) -> int:
    """Mount a new FUSE connection at mountpoint with libfuse-style options; its descriptor
    (close-on-exec). Requests wait in the kernel until whoever gets the descriptor answers INIT.
    OSError from mount(2) (EPERM without the privilege), ValueError for an unknown option."""
    source, fstype, flags, data = mount_args(options)
    st = os.stat(mountpoint)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        full = f"fd={fd},rootmode={stat.S_IFMT(st.st_mode):o},user_id={os.getuid()},group_id={os.getgid()}"
        if data:
            full += "," + data
        libc.mount(source, mountpoint, fstype, flags, full)
    except BaseException:
        os.close(fd)
        raise
    return fd


def mountpoint_of(source: str, fstype: str) -> bytes | None:
    """The one mountpoint of a FUSE mount named `source` (its fsname), None if not exactly one."""
    want = os.fsencode(source)
    found = [m.mountpoint for m in mountinfo.mounts() if m.source == want and m.fstype == fstype]
    return found[0] if len(found) == 1 else None
