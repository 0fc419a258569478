"""How the changeset writer sees upper entries: whiteouts, opaque dirs, presented metadata.

A thin adapter over fs/core/upperformat.py (the readers the filesystem owns), so
the tar always shows what the mount showed: owners and modes the daemon could
not apply live in `user.containers.override_stat`, whiteouts are 0/0 char
devices or `.wh.NAME` files, opaque dirs carry an opaque xattr or a
`.wh..wh..opq` file. Owners the daemon did apply are host ids; a snapshot mounted
in another user namespace maps them back (idmap.IdTranslation).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..fs.core import upperformat
from ..fs.core.upperformat import Presented
from ..layerentry import Kind
from .idmap import IdTranslation


def whiteout_target(path: Path, name: bytes, st: os.stat_result) -> bytes | None:
    """The name an upper entry deletes, or None if it is not a whiteout."""
    if name.startswith(upperformat.WH_PREFIX) and not stat.S_ISREG(st.st_mode):
        return None  # only empty regular `.wh.` files are markers
    return upperformat.whiteout_target(name, st.st_mode, st.st_rdev)


def is_opaque(path: Path) -> bool:
    return upperformat.is_opaque(os.fsencode(path))


def presented(path: Path, st: os.stat_result, ids: IdTranslation | None = None) -> Presented:
    """Owner, mode and type as the mount presents them (override xattr first, then the host
    stat, whose owners `ids` maps into the mount's user namespace)."""
    override = None if stat.S_ISLNK(st.st_mode) else upperformat.read_override(os.fsencode(path))
    p = upperformat.presented_stat(st, override)
    if override is None and ids is not None:
        p.uid, p.gid = ids.owner(p.uid, p.gid, repr(str(path)))
    return p


def visible_xattrs(path: Path, kind: Kind) -> dict[bytes, bytes]:
    """User-visible xattrs of an upper entry (the filesystem's bookkeeping removed)."""
    if kind == "sym":
        return {}
    return upperformat.visible_xattrs(upperformat.read_xattrs(os.fsencode(path)))
