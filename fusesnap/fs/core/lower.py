"""Where lower layers come from: a plain directory or a store layer's index.

A LowerSource yields the LayerEntry records of ONE layer, in any order, with
the metadata the merged view must present (not necessarily the host file's).
Whiteouts come as `.wh.NAME` entries or char 0/0 devices, opaque directories as
`.wh..wh..opq` entries or opaque xattrs; lowertree interprets them.
"""

from __future__ import annotations

import os
import stat as S
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol, runtime_checkable

from fusesnap.errors import InvalidInput
from fusesnap.layerentry import KIND_OF_FMT, LayerEntry
from fusesnap.fs.core import upperformat
from fusesnap.fs.core.longpath import short


# What a layer entry does to the merged tree (entry_role)
ROOT, WHITEOUT, OPAQUE, MEMBER = range(4)


def entry_role(e: LayerEntry) -> tuple[int, bytes, bytes] | None:
    """How one layer entry acts on the layers below it, as every lower-tree builder reads it:
    (ROOT, b"", b"") the layer's root directory; (WHITEOUT, parent, name) hides `name`;
    (OPAQUE, dir, b"") hides everything below `dir`; (MEMBER, parent, name) an entry of its
    own; None for nothing (a NUL in the path, a root entry that is no directory)."""
    path = e.path.strip(b"/")
    if path in (b"", b"."):
        return (ROOT, b"", b"") if e.kind == "dir" else None
    if b"\0" in path:
        return None
    parent, _, name = path.rpartition(b"/")
    if name in (b".", b"..") or b"/../" in b"/" + path + b"/":
        raise InvalidInput(f"lower entry with unsafe path {path!r}")
    if name.startswith(upperformat.WH_PREFIX):
        return (OPAQUE, parent, b"") if name == upperformat.OPQ_NAME else (WHITEOUT, parent, name[4:])
    if e.kind == "chr" and e.devmajor == 0 and e.devminor == 0:
        return (WHITEOUT, parent, name)
    return (MEMBER, parent, name)


@dataclass
class LayerMarks:
    """What a layer says about the layers below it (see layer_members)."""

    root: LayerEntry | None = None  # the layer's root directory entry
    whiteouts: list[tuple[bytes, bytes]] = field(default_factory=list)  # (parent, name) hidden
    opaques: list[bytes] = field(default_factory=list)  # directories whose lower contents are hidden


def layer_members(entries: Iterable[LayerEntry], marks: LayerMarks) -> Iterator[tuple[LayerEntry, bytes, bytes]]:
    """(entry, parent, name) of a layer's own entries; its root entry, whiteouts and opaque
    markers (also an opaque xattr on a directory) go to `marks` as they pass."""
    for e in entries:
        role = entry_role(e)
        if role is None:
            continue
        what, parent, name = role
        if what == ROOT:
            marks.root = e
            if upperformat.xattrs_say_opaque(e.xattrs):
                marks.opaques.append(b"")
        elif what == WHITEOUT:
            marks.whiteouts.append((parent, name))
        elif what == OPAQUE:
            marks.opaques.append(parent)
        else:
            if e.kind == "dir" and upperformat.xattrs_say_opaque(e.xattrs):
                marks.opaques.append(e.path.strip(b"/"))
            yield e, parent, name


@runtime_checkable
class LowerSource(Protocol):
    data_root: Path
    """Directory that the `data` paths of 'reg' entries are relative to."""

    def entries(self) -> Iterable[LayerEntry]: ...


class DirLower:
    """A plain host directory as a layer (the fuse-overlayfs front end's lowerdir).

    Presents host metadata, corrected by a `user.containers.override_stat`
    (or fuse-overlayfs') xattr when the directory was written rootless."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.data_root = Path(path)
        if not self.data_root.is_dir():
            raise NotADirectoryError(f"lower directory {str(path)!r} does not exist or is not a directory")

    def entries(self) -> Iterator[LayerEntry]:
        root = os.fsencode(self.data_root)
        seen: dict[tuple[int, int], bytes] = {}
        st = os.lstat(root)
        yield LayerEntry(b".", "dir", st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns,
                         xattrs=upperformat.read_xattrs(root) or {})
        stack: list[bytes] = [b""]
        while stack:
            rel = stack.pop()
            base = root + b"/" + rel if rel else root
            try:
                it = os.scandir(short(base))
            except OSError:
                continue
            with it:
                for de in it:
                    name = de.name
                    relp = rel + b"/" + name if rel else name
                    st = de.stat(follow_symlinks=False)
                    full = short(base + b"/" + name)
                    xattrs = upperformat.read_xattrs(full)
                    mode = st.st_mode
                    uid, gid, rdev = st.st_uid, st.st_gid, st.st_rdev
                    ov = upperformat.override_in(xattrs) if xattrs else None
                    if ov is not None:
                        p = upperformat.presented_stat(st, ov)
                        mode, uid, gid, rdev = p.mode, p.uid, p.gid, p.rdev
                    fmt = S.S_IFMT(mode)
                    kind = KIND_OF_FMT.get(fmt, "reg")
                    if fmt == S.S_IFDIR:
                        stack.append(relp)
                    if S.S_ISREG(st.st_mode) and st.st_nlink > 1:
                        key = (st.st_dev, st.st_ino)
                        first = seen.get(key)
                        if first is not None:
                            yield LayerEntry(relp, "hard", mode & 0o7777, uid, gid, st.st_mtime_ns,
                                             linkname=first)
                            continue
                        seen[key] = relp
                    yield LayerEntry(
                        path=relp, kind=kind, mode=mode & 0o7777, uid=uid, gid=gid,
                        mtime_ns=st.st_mtime_ns,
                        size=st.st_size if fmt == S.S_IFREG else 0,
                        linkname=os.readlink(full) if fmt == S.S_IFLNK else b"",
                        devmajor=os.major(rdev) if fmt in (S.S_IFCHR, S.S_IFBLK) else 0,
                        devminor=os.minor(rdev) if fmt in (S.S_IFCHR, S.S_IFBLK) else 0,
                        xattrs=xattrs if xattrs is not None else {},
                        data=relp if fmt == S.S_IFREG else None,
                    )


class IndexLower:
    """A store layer: entries from its index (tar metadata), content under fs_dir."""

    def __init__(self, entries: Iterable[LayerEntry], fs_dir: str | os.PathLike) -> None:
        self._entries = entries
        self.data_root = Path(fs_dir)

    def entries(self) -> Iterable[LayerEntry]:
        return self._entries
