"""/proc/PID/mountinfo, parsed once for every reader in the package.

Paths come back as bytes with mountinfo's octal escapes (space, tab, newline,
backslash written as \\ooo) undone, so that they compare equal to real paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

SELF = "/proc/self/mountinfo"


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of mountinfo: the fields fusesnap reads."""

    mount_id: int
    device: str          # "major:minor"
    root: bytes          # the mounted subtree of its filesystem
    mountpoint: bytes
    options: str         # per-mount options (ro, nosuid, nodev, ...)
    fstype: str          # e.g. "fuse.fusesnap", "overlay"
    source: bytes
    super_options: str   # per-superblock options (default_permissions, allow_other, ...)

    def flags(self) -> set[str]:
        """Per-mount and per-superblock options together."""
        return set(self.options.split(",")) | set(self.super_options.split(","))


def unescape(field: bytes) -> bytes:
    """Undo mountinfo's \\ooo octal escapes."""
    if b"\\" not in field:
        return field
    out, i = bytearray(), 0
    while i < len(field):
        if field[i:i + 1] == b"\\" and len(field) - i >= 4 and field[i + 1:i + 4].isdigit():
            out.append(int(field[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def parse_line(line: bytes) -> Mount | None:
    left, sep, right = line.rstrip(b"\n").partition(b" - ")
    a, b = left.split(), right.split()
    if not sep or len(a) < 6 or len(b) < 2:
        return None
    return Mount(int(a[0]), a[2].decode(), unescape(a[3]), unescape(a[4]), a[5].decode(),
                 b[0].decode(), unescape(b[1]), b[2].decode() if len(b) > 2 else "")


def mounts(path: str = SELF) -> list[Mount]:
    """Every mount the reading process can see, in mount order (later mounts stack on earlier)."""
    with open(path, "rb") as f:
        return [m for m in map(parse_line, f) if m is not None]


def canonical(mountpoint: str | bytes | os.PathLike) -> bytes:
    """A mount point as mountinfo shows it: the parent resolved, the last name kept
    (no stat of the mount point itself, which may be a dead FUSE mount)."""
    p = os.path.abspath(os.fsencode(mountpoint))
    parent, name = os.path.split(p)
    return os.path.join(os.path.realpath(parent), name) if name else p


def find(mountpoint: str | bytes | os.PathLike, path: str = SELF) -> Mount | None:
    """The top-most mount at mountpoint, or None."""
    want = canonical(mountpoint)
    found = None
    for m in mounts(path):
        if m.mountpoint == want:
            found = m
    return found


def is_mountpoint(path: str | bytes | os.PathLike) -> bool:
    return find(path) is not None
