"""Read-ahead of a live FUSE mount: how much the kernel asks the daemon for ahead of a reader.

A FUSE mount starts with the kernel's 128 KiB read-ahead (the FUSE_INIT reply
can only lower it), so a sequential reader costs one READ round trip per
128 KiB: fuse-overlayfs gets 128 KiB requests. Raising the mount's
backing-device read-ahead after FUSE_INIT lets the kernel send READ requests
of up to max_pages (1 MiB with libfuse 3). More than that measured no faster
(docs/BENCHMARKS.md). Only root may write /sys/class/bdi; anyone else keeps
the kernel's value (logged at debug).

The device is found in /proc/self/mountinfo, never by stat(2) of the mount
point: the daemon calls this for its own mount, and a stat would wait for the
request loop it is running in.
"""

from __future__ import annotations

import logging
import os

from fusesnap.linux.mountinfo import find

log = logging.getLogger("fusesnap.fs")

DEFAULT_KB = 1024       # one max_pages (1 MiB) FUSE request ahead of the reader
BDI_ROOT = "/sys/class/bdi"


def device_of(mountpoint: str | bytes | os.PathLike, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """'major:minor' of the file system mounted at mountpoint (the top-most mount), or None."""
    try:
        m = find(mountpoint, mountinfo)
    except OSError as e:
        log.debug("read-ahead: cannot read %s: %s", mountinfo, e)
        return None
    return m.device if m is not None else None


def bdi_file(dev: str) -> str | None:
    """The read_ahead_kb file of the backing device named 'major:minor' (fuseblk adds a suffix)."""
    for name in (dev, f"{dev}-fuseblk"):
        path = os.path.join(BDI_ROOT, name, "read_ahead_kb")
        if os.path.exists(path):
            return path
    return None


def read_ahead_kb(mountpoint: str | bytes | os.PathLike) -> int | None:
    """The mount's current read-ahead in KiB, or None when it cannot be found."""
    dev = device_of(mountpoint)
    path = bdi_file(dev) if dev else None
    if path is None:
        return None
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def set_read_ahead(mountpoint: str | bytes | os.PathLike, kb: int = DEFAULT_KB) -> bool:
    """Set the read-ahead of the live mount at mountpoint to kb KiB; True if it was set.

    Call it after FUSE_INIT (the INIT reply would lower it again). Without the
    right to write the sysfs file (not root, or root in a user namespace) it
    changes nothing and says why at debug level."""
    if kb < 0:
        raise ValueError(f"read-ahead must be >= 0 KiB, not {kb}")
    dev = device_of(mountpoint)
    if dev is None:
        log.debug("read-ahead: %s is not a mount point", os.fsdecode(mountpoint))
        return False
    path = bdi_file(dev)
    if path is None:
        log.debug("read-ahead: no backing device %s in %s", dev, BDI_ROOT)
        return False
    if not os.access(path, os.W_OK):
        log.debug("read-ahead: %s not writable (uid %d): kernel default kept", path, os.geteuid())
        return False
    try:
        with open(path, "w") as f:
            f.write(f"{kb}\n")
    except OSError as e:
        log.debug("read-ahead: cannot write %s: %s", path, e)
        return False
    log.debug("read-ahead of %s (bdi %s) set to %d KiB", os.fsdecode(mountpoint), dev, kb)
    return True
