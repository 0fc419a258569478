"""How an upper (or plain-directory lower) stores what a host directory cannot.

The format is the one kernel overlayfs, fuse-overlayfs and containers/storage
share, so an upper written by fusesnap can be mounted by them and vice versa:

- whiteout for NAME: char device 0/0 named NAME, or an empty file `.wh.NAME`;
- opaque directory: xattr `trusted.overlay.opaque=y`, `user.overlay.opaque=y`
  or `user.fuseoverlayfs.opaque=y`, or a `.wh..wh..opq` file inside it;
- metadata the daemon could not apply: xattr `user.containers.override_stat`
  = `uid:gid:0MODE[:TYPE]` (TYPE: file, dir, symlink, pipe, socket,
  block-MAJ-MIN, char-MAJ-MIN); `user.fuseoverlayfs.override_stat` is read too.

Everything here is plain functions over names, stat results and xattr dicts so
the snapshotter's changeset writer can reuse them.
"""

from __future__ import annotations

import errno
import os
import stat as S
from dataclasses import dataclass

WH_PREFIX = b".wh."
OPQ_NAME = b".wh..wh..opq"

OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.overlay.opaque", b"user.fuseoverlayfs.opaque")
OVERRIDE_XATTR = b"user.containers.override_stat"
OVERRIDE_XATTRS = (b"user.containers.override_stat", b"user.fuseoverlayfs.override_stat",
                   b"security.fuseoverlayfs.override_stat")
# xattr_permissions=N (fuse-overlayfs): which xattr stores presented metadata.
XATTR_PERMISSIONS_NAMES = {0: OVERRIDE_XATTR, 1: b"security.fuseoverlayfs.override_stat",
                           2: b"user.fuseoverlayfs.override_stat"}
HIDDEN_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.",
                   b"security.fuseoverlayfs.", b"user.containers.override_stat")


def whiteout_target(name: bytes, st_mode: int | None = None, st_rdev: int = 0) -> bytes | None:
    """NAME hidden by this upper entry, or None if the entry is no whiteout.

    `.wh..wh..opq` is not a whiteout (see is_opaque_marker)."""
    if name.startswith(WH_PREFIX):
        if name == OPQ_NAME:
            return None
        return name[4:]
    if st_mode is not None and S.S_ISCHR(st_mode) and st_rdev == 0:
        return name
    return None


def is_opaque_marker(name: bytes) -> bool:
    return name == OPQ_NAME


def is_internal_name(name: bytes) -> bool:
    """Names that never appear in a merged view (whiteouts and opaque markers)."""
    return name.startswith(WH_PREFIX)


def xattrs_say_opaque(xattrs: dict[bytes, bytes] | None) -> bool:
    if not xattrs:
        return False
    for k in OPAQUE_XATTRS:
        v = xattrs.get(k)
        if v is not None and v[:1] in (b"y", b"Y"):
            return True
    return False


def is_opaque(path: str | bytes | int, dir_fd: int | None = None) -> bool:
    """True if the upper directory at path is opaque (xattr or `.wh..wh..opq` inside)."""
    for name in OPAQUE_XATTRS:
        try:
            if isinstance(path, int):
                v = os.getxattr(path, name)
            else:
                v = os.getxattr(_abs(path, dir_fd), name, follow_symlinks=False)
        except OSError:
            continue
        if v[:1] in (b"y", b"Y"):
            return True
    try:
        if isinstance(path, int):
            os.stat(OPQ_NAME, dir_fd=path, follow_symlinks=False)
        else:
            p = os.path.join(os.fsencode(path), OPQ_NAME)
            os.stat(p, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except OSError:
        return False


def _abs(path: str | bytes, dir_fd: int | None) -> bytes:
    p = os.fsencode(path)
    if dir_fd is None or p.startswith(b"/"):
        return p
    return b"/proc/self/fd/%d/%s" % (dir_fd, p)


def read_xattrs(path: bytes) -> dict[bytes, bytes] | None:
    """All xattrs of a host object (symlinks not followed), or None when it has none."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return None
    if not names:
        return None
    out = {}
    for n in names:
        try:
            out[os.fsencode(n)] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            pass
    return out or None


def is_hidden_xattr(name: bytes) -> bool:
    return name.startswith(HIDDEN_PREFIXES)


def visible_xattrs(xattrs: dict[bytes, bytes] | None) -> dict[bytes, bytes]:
    """The xattrs a merged view shows: internal overlay/override markers removed."""
    if not xattrs:
        return {}
    return {k: v for k, v in xattrs.items() if not k.startswith(HIDDEN_PREFIXES)}


@dataclass(frozen=True, slots=True)
class Override:
    uid: int
    gid: int
    mode: int            # permission bits (07777)
    fmt: int | None      # S_IFMT bits when the xattr names a type
    rdev: int = 0


_TYPES = {b"file": S.S_IFREG, b"dir": S.S_IFDIR, b"symlink": S.S_IFLNK,
          b"pipe": S.S_IFIFO, b"socket": S.S_IFSOCK}


def parse_override(value: bytes) -> Override | None:
    """Parse `uid:gid:mode[:type]`; None when malformed (it is then ignored)."""
    parts = value.strip(b"\0 \n").split(b":")
    if len(parts) < 3:
        return None
    try:
        uid, gid, mode = int(parts[0]), int(parts[1]), int(parts[2], 8)
    except ValueError:
        return None
    fmt = None
    rdev = 0
    if len(parts) >= 4 and parts[3]:
        t = parts[3]
        if t in _TYPES:
            fmt = _TYPES[t]
        elif t.startswith((b"block-", b"char-")):
            try:
                kind, maj, mnr = t.split(b"-")
                fmt = S.S_IFBLK if kind == b"block" else S.S_IFCHR
                rdev = os.makedev(int(maj), int(mnr))
            except ValueError:
                return None
        else:
            return None
    else:
        # Older writers put the full st_mode in the third field.
        if mode & 0o170000:
            fmt = S.S_IFMT(mode)
    return Override(uid, gid, mode & 0o7777, fmt, rdev)


def format_override(uid: int, gid: int, mode: int, fmt: int | None = None, rdev: int = 0) -> bytes:
    """`uid:gid:0MODE` plus `:TYPE` when the presented type differs from the host's."""
    s = b"%d:%d:0%o" % (uid, gid, mode & 0o7777)
    if fmt is None:
        return s
    for name, f in _TYPES.items():
        if f == fmt:
            return s + b":" + name
    kind = b"block" if fmt == S.S_IFBLK else b"char"
    return s + b":%s-%d-%d" % (kind, os.major(rdev), os.minor(rdev))


def override_in(xattrs: dict[bytes, bytes], names: tuple[bytes, ...] = OVERRIDE_XATTRS) -> Override | None:
    """The first valid override among already-read xattrs (same precedence as read_override)."""
    for n in names:
        v = xattrs.get(n)
        if v is not None:
            o = parse_override(v)
            if o is not None:
                return o
    return None


def read_override(path: bytes | int, names: tuple[bytes, ...] = OVERRIDE_XATTRS) -> Override | None:
    """The override stored on a host object (fd or absolute path; symlinks not followed)."""
    for n in names:
        try:
            if isinstance(path, int):
                v = os.getxattr(path, n)
            else:
                v = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
                continue
            raise
        o = parse_override(v)
        if o is not None:
            return o
    return None


@dataclass(slots=True)
class Presented:
    mode: int
    uid: int
    gid: int
    rdev: int


def presented_stat(st: os.stat_result, override: Override | None) -> Presented:
    """Owner, full mode and device number a merged view shows for a host object."""
    if override is None:
        return Presented(st.st_mode, st.st_uid, st.st_gid, st.st_rdev)
    fmt = override.fmt if override.fmt is not None else S.S_IFMT(st.st_mode)
    rdev = override.rdev if fmt in (S.S_IFCHR, S.S_IFBLK) and override.fmt is not None else st.st_rdev
    return Presented(fmt | override.mode, override.uid, override.gid, rdev)
