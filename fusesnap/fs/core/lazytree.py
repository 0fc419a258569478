"""A merged lower tree over plain directories that merges each directory on first use.

The fuse-overlayfs front end gets its lowers as host directories and cannot
cache a merged tree between mounts, so a full scan would make every mount cost
O(all entries). This tree mounts in O(1): a directory's entries are merged
from all layers (top first, whiteouts and opaque markers applied) the first
time anyone looks into it, and never again (lowers never change). Nodes are
the same LNode objects the eager LowerTree uses; inode numbers are assigned
on first sight and hard links (same host inode) share one node.
"""

from __future__ import annotations

import os
import stat as S
from typing import Iterator, Sequence

from fusesnap.fs.core import upperformat
from fusesnap.fs.core.longpath import LIMIT, short
from fusesnap.fs.core.lowertree import LNode, lookup_path

_KIDS = LNode.__dict__["kids"]
_NLINK = LNode.__dict__["nlink"]


class LazyDir(LNode):
    """A merged lower directory; `kids` and `nlink` are computed on first access."""

    __slots__ = ("hostdirs", "tree", "scanned", "in_listing")

    @property
    def kids(self):
        k = _KIDS.__get__(self)
        if k is None:
            k = self.tree._merge(self)
        return k

    @kids.setter
    def kids(self, v):
        _KIDS.__set__(self, v)

    @property
    def nlink(self):
        if _KIDS.__get__(self) is None and not self.in_listing:
            # one layer: the host's 2 + subdirs; several: counted from names, not merged
            # (a stat of a wide directory over many layers then costs no merge), once:
            # a kept scan means the count is in the slot
            if len(self.hostdirs) > 1 and self.scanned is None:
                _NLINK.__set__(self, 2 + self.tree.subdir_count(self))
            return _NLINK.__get__(self)
        return 2 + sum(1 for k in self.kids.values() if S.S_ISDIR(k.mode))

    def listed(self) -> None:
        """This directory is being listed: a walker lists its subdirectories next, so
        their link counts come from merging them now, which reads each one's blocks
        and its entries' inodes together (measured faster cold than counting first)."""
        for k in self.kids.values():
            if type(k) is LazyDir:
                k.in_listing = True

    @nlink.setter
    def nlink(self, v):
        _NLINK.__set__(self, v)

    def is_dir(self) -> bool:
        return True


def _layers(hostdirs: Sequence[tuple[int, bytes]]) -> Iterator[tuple[int, bytes, list[os.DirEntry[bytes]],
                                                                     list[bytes], bool]]:
    """Each readable layer's part of a directory, top first: (layer, host dir, its entries
    but the `.wh.` ones, the names those white out, whether an `.wh..wh..opq` marker
    makes it opaque). A layer that cannot be read is skipped (a missing layer directory)."""
    for layer, hd in hostdirs:
        try:
            it = os.scandir(short(hd))
        except OSError:
            continue
        entries: list[os.DirEntry[bytes]] = []
        whiteouts: list[bytes] = []
        opaque = False
        with it:
            for de in it:
                name = de.name
                if not name.startswith(b".wh."):
                    entries.append(de)
                elif name == upperformat.OPQ_NAME:
                    opaque = True
                else:
                    whiteouts.append(name[4:])
        yield layer, hd, entries, whiteouts, opaque


def _presented(st: os.stat_result, xattrs: dict[bytes, bytes] | None) -> tuple[int, int, int, int]:
    ov = upperformat.override_in(xattrs) if xattrs else None
    if ov is None:
        return st.st_mode, st.st_uid, st.st_gid, st.st_rdev
    p = upperformat.presented_stat(st, ov)
    return p.mode, p.uid, p.gid, p.rdev


class LazyLowerTree:
    """Drop-in for LowerTree over host directories (lowerdir=, top-most first)."""

    def __init__(self, dirs: Sequence[str | os.PathLike]) -> None:
        self.dirs = [os.fsencode(os.path.abspath(d)) for d in dirs]
        for d in self.dirs:
            if not os.path.isdir(d):
                raise NotADirectoryError(f"lower directory {os.fsdecode(d)!r} does not exist")
        self._next = 2
        self.by_host: dict[tuple[int, int, int], LNode] = {}
        top = os.lstat(self.dirs[0])
        xattrs = upperformat.read_xattrs(self.dirs[0])
        root = self._dir_node(top, xattrs, list(enumerate(self.dirs)))
        root.ino = 1
        self._next = 2
        if upperformat.xattrs_say_opaque(xattrs):
            root.hostdirs = root.hostdirs[:1]
        self.root = root

    # the interface Union uses -------------------------------------------------
    @property
    def max_ino(self) -> int:
        return self._next - 1

    def new_ino(self) -> int:
        n = self._next
        self._next += 1
        return n

    def lookup(self, path: bytes | str) -> LNode | None:
        return lookup_path(self.root, path)

    def link_paths(self, ln: LNode) -> list[bytes] | None:
        """All merged paths of a hard-linked lower file (scans the lowers: copy-up only)."""
        if ln.nlink < 2 or S.S_ISDIR(ln.mode):
            return None
        out: list[bytes] = []
        stack: list[tuple[bytes, LNode]] = [(b"", self.root)]
        while stack:
            path, d = stack.pop()
            for name, n in d.kids.items():
                p = path + b"/" + name if path else name
                if n is ln:
                    out.append(p)
                elif S.S_ISDIR(n.mode):
                    stack.append((p, n))
        return out if len(out) > 1 else None

    # building -----------------------------------------------------------------
    def _dir_node(self, st: os.stat_result, xattrs, hostdirs: list[tuple[int, bytes]]) -> LazyDir:
        mode, uid, gid, _ = _presented(st, xattrs)
        n = LazyDir.__new__(LazyDir)
        LNode.__init__(n, S.S_IFDIR | (mode & 0o7777), uid, gid, 0, st.st_mtime_ns, 0, None, None,
                       upperformat.visible_xattrs(xattrs) or None, None)
        n.hostdirs = hostdirs
        n.tree = self
        n.scanned = None
        n.in_listing = False
        _NLINK.__set__(n, st.st_nlink)
        n.ino = self.new_ino()
        return n

    def subdir_count(self, d: LazyDir) -> int:
        """How many subdirectories d's merge (below) holds, from names and d_type alone:
        the same layers, `.wh.` names and opaque markers, no lstat or xattrs. A char 0/0
        whiteout needs no stat here: like any non-directory on top, it keeps the name's
        lower directories out. An opaque subdirectory is still one."""
        kinds: dict[bytes, bool] = {}      # name -> a directory, at its top-most occurrence
        hidden: set[bytes] = set()
        d.scanned = list(_layers(d.hostdirs))    # kept for the merge: one scandir per layer
        for _, _, entries, layer_wh, opaque in d.scanned:
            for de in entries:
                if de.name not in kinds and de.name not in hidden:
                    kinds[de.name] = de.is_dir(follow_symlinks=False)
            hidden.update(layer_wh)
            if opaque:
                break
        return sum(kinds.values())

    def _merge(self, d: LazyDir) -> dict[bytes, LNode]:
        kids: dict[bytes, LNode] = {}
        hidden: set[bytes] = set()
        subdirs: dict[bytes, list[tuple[int, bytes]]] = {}
        IFMT, IFREG, IFCHR = 0o170000, S.S_IFREG, S.S_IFCHR
        layers = d.scanned if d.scanned is not None else _layers(d.hostdirs)
        d.scanned = None
        for layer, hd, entries, layer_wh, opaque in layers:
            # NAME_MAX is 255: below this every child path is short as it is
            short_ok = len(hd) + 257 < LIMIT
            for de in entries:
                name = de.name
                if name in kids or name in hidden:
                    sub = subdirs.get(name)
                    if sub is not None:
                        if de.is_dir(follow_symlinks=False):
                            full = hd + b"/" + name
                            sub.append((layer, full))
                            if upperformat.xattrs_say_opaque(upperformat.read_xattrs(short(full))):
                                del subdirs[name]
                        else:
                            del subdirs[name]   # a non-directory or a whiteout ends the merge of NAME
                    continue
                st = de.stat(follow_symlinks=False)
                fmt = st.st_mode & IFMT
                if fmt == IFCHR and st.st_rdev == 0:
                    layer_wh.append(name)
                    continue
                full = hd + b"/" + name
                sp = full if short_ok else short(full)
                xattrs = upperformat.read_xattrs(sp)   # one listxattr; the values only when there are names
                if xattrs is None and fmt == IFREG and st.st_nlink == 1:
                    # the common case (a plain file, no xattrs, no hard links): host metadata as is
                    n = LNode(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                              0, None, full, None, None)
                    n.ino = self._next
                    self._next += 1
                    kids[name] = n
                    continue
                if fmt == S.S_IFDIR:
                    hds = [(layer, full)]
                    n = self._dir_node(st, xattrs, hds)
                    if not upperformat.xattrs_say_opaque(xattrs):
                        subdirs[name] = hds
                    kids[name] = n
                    continue
                mode, uid, gid, rdev = _presented(st, xattrs)
                key = (layer, st.st_dev, st.st_ino)
                if fmt == S.S_IFREG and st.st_nlink > 1:
                    n = self.by_host.get(key)
                    if n is not None:
                        kids[name] = n
                        continue
                n = LNode(S.S_IFMT(mode) | (mode & 0o7777), uid, gid,
                          st.st_size if fmt in (S.S_IFREG, S.S_IFLNK) else 0, st.st_mtime_ns,
                          rdev if S.S_IFMT(mode) in (S.S_IFCHR, S.S_IFBLK) else 0,
                          os.readlink(short(full)) if fmt == S.S_IFLNK else None,
                          full if fmt == S.S_IFREG else None,
                          upperformat.visible_xattrs(xattrs) or None, None)
                n.ino = self.new_ino()
                if fmt == S.S_IFREG and st.st_nlink > 1:
                    n.nlink = st.st_nlink
                    self.by_host[key] = n
                kids[name] = n
            # names in this layer are final; its whiteouts hide lower layers only
            for name in kids:
                if name not in subdirs:
                    hidden.add(name)
            hidden.update(layer_wh)
            for name in layer_wh:
                subdirs.pop(name, None)
            if opaque:
                break
        d.kids = kids
        return kids
