"""How the changeset writer sees upper entries: whiteouts, opaque dirs, presented metadata.

Thin adapter over fs/upperformat.py (the readers the filesystem owns), so
the tar always shows what the mount showed: owners and modes the daemon
could not apply live in `user.containers.override_stat`, whiteouts are 0/0
char devices or `.wh.NAME` files, and opaque dirs carry an opaque xattr or a
`.wh..wh..opq` file.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..layerentry import Kind

OVERRIDE_XATTRS = (b"user.containers.override_stat", b"user.fuseoverlayfs.override_stat")
OPAQUE_XATTRS = (b"trusted.overlay.opaque", b"user.fuseoverlayfs.opaque", b"user.overlay.opaque")
# Bookkeeping the filesystem keeps on upper files; never part of a layer.
_HIDDEN_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"user.fuseoverlayfs.", b"user.containers.",
                          b"user.fusesnap.")

_TYPE_BY_NAME = {"file": "reg", "dir": "dir", "symlink": "sym", "pipe": "fifo", "socket": "sock"}


@dataclass
class Presented:
    kind: Kind
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    devmajor: int = 0
    devminor: int = 0


def _kind_of(mode: int) -> Kind:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "sym"
    if stat.S_ISCHR(mode):
        return "chr"
    if stat.S_ISBLK(mode):
        return "blk"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "reg"


def _getxattr(path: Path, name: bytes) -> bytes | None:
    try:
        return os.getxattr(os.fsencode(path), name, follow_symlinks=False)
    except OSError:
        return None


def whiteout_target(path: Path, name: bytes, st: os.stat_result) -> bytes | None:
    """The name an upper entry deletes, or None if it is not a whiteout."""
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return name
    if name.startswith(b".wh.") and name != b".wh..wh..opq" and stat.S_ISREG(st.st_mode):
        return name[4:]
    return None


def is_opaque(path: Path) -> bool:
    for x in OPAQUE_XATTRS:
        if _getxattr(path, x) == b"y":
            return True
    return os.path.lexists(os.path.join(os.fsencode(path), b".wh..wh..opq"))


def presented(path: Path, st: os.stat_result) -> Presented:
    """Owner, mode and type as the mount presents them (override xattr first, then the host stat)."""
    kind = _kind_of(st.st_mode)
    p = Presented(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                  os.major(st.st_rdev) if kind in ("chr", "blk") else 0,
                  os.minor(st.st_rdev) if kind in ("chr", "blk") else 0)
    if kind == "sym":
        return p
    raw = None
    for x in OVERRIDE_XATTRS:
        raw = _getxattr(path, x)
        if raw is not None:
            break
    if raw is None:
        return p
    try:
        parts = raw.decode().strip("\0").split(":")
        uid, gid, mode = int(parts[0]), int(parts[1]), int(parts[2], 8)
    except (ValueError, IndexError):
        return p  # unreadable override: the host stat is the best we have
    p.uid, p.gid = uid, gid
    if stat.S_IFMT(mode):
        p.kind = _kind_of(mode)
    p.mode = stat.S_IMODE(mode)
    if len(parts) > 3:
        t = parts[3]
        if t.startswith(("block-", "char-")):
            typ, maj, mi = t.split("-")
            p.kind = "blk" if typ == "block" else "chr"
            p.devmajor, p.devminor = int(maj), int(mi)
        elif _TYPE_BY_NAME.get(t) in ("reg", "dir", "sym", "fifo"):
            p.kind = _TYPE_BY_NAME[t]  # type: ignore[assignment]
    return p


def visible_xattrs(path: Path, kind: Kind) -> dict[bytes, bytes]:
    """User-visible xattrs of an upper entry (the filesystem's bookkeeping removed)."""
    if kind == "sym":
        return {}
    try:
        names = os.listxattr(os.fsencode(path), follow_symlinks=False)
    except OSError:
        return {}
    out: dict[bytes, bytes] = {}
    for n in names:
        nb = os.fsencode(n)
        if nb.startswith(_HIDDEN_XATTR_PREFIXES):
            continue
        v = _getxattr(path, nb)
        if v is not None:
            out[nb] = v
    return out
