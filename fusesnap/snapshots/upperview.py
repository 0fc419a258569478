"""How the changeset writer sees upper entries: whiteouts, opaque dirs, presented metadata.

A thin adapter over fs/upperformat.py (the readers the filesystem owns), so
the tar always shows what the mount showed: owners and modes the daemon could
not apply live in `user.containers.override_stat`, whiteouts are 0/0 char
devices or `.wh.NAME` files, opaque dirs carry an opaque xattr or a
`.wh..wh..opq` file.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..fs.core import upperformat as uf
from ..layerentry import Kind, kind_of_mode


@dataclass
class Presented:
    kind: Kind
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    devmajor: int = 0
    devminor: int = 0



def whiteout_target(path: Path, name: bytes, st: os.stat_result) -> bytes | None:
    """The name an upper entry deletes, or None if it is not a whiteout."""
    if name.startswith(uf.WH_PREFIX) and not stat.S_ISREG(st.st_mode):
        return None  # only empty regular `.wh.` files are markers
    return uf.whiteout_target(name, st.st_mode, st.st_rdev)


def is_opaque(path: Path) -> bool:
    return uf.is_opaque(os.fsencode(path))


def presented(path: Path, st: os.stat_result) -> Presented:
    """Owner, mode and type as the mount presents them (override xattr first, then the host stat)."""
    override = None if stat.S_ISLNK(st.st_mode) else uf.read_override(os.fsencode(path))
    p = uf.presented_stat(st, override)
    kind: Kind = kind_of_mode(p.mode)  # type: ignore[assignment]
    dev = (os.major(p.rdev), os.minor(p.rdev)) if kind in ("chr", "blk") else (0, 0)
    return Presented(kind, stat.S_IMODE(p.mode), p.uid, p.gid, *dev)


def visible_xattrs(path: Path, kind: Kind) -> dict[bytes, bytes]:
    """User-visible xattrs of an upper entry (the filesystem's bookkeeping removed)."""
    if kind == "sym":
        return {}
    return uf.visible_xattrs(uf.read_xattrs(os.fsencode(path)))
