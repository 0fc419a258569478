"""The merged, immutable tree of all lower layers, built once per mount.

Lowers never change, so instead of probing N directories per request the
daemon merges them once: one dict of name -> node per directory, whiteouts and
opaque directories already applied, hard-link groups resolved to one shared
node, inode numbers and st_nlink precomputed. The snapshotter caches a chain's
tree (save/load) and extends a parent's tree by one layer (overlay).
"""

from __future__ import annotations

import marshal
import os
import stat as S
from pathlib import Path
from typing import Iterable, Sequence

from fusesnap.errors import InvalidInput
from fusesnap.fs.core import upperformat
from fusesnap.fs.core.lower import DirLower, LayerMarks, LowerSource, layer_members
from fusesnap.fs.core.packedtree import PackedTree, is_packed
from fusesnap.layerentry import FMT_OF_KIND, LayerEntry

_FORMAT_VERSION = 1


class LNode:
    """One lower object. Shared by every name of a hard-link group."""

    __slots__ = ("ino", "mode", "uid", "gid", "size", "mtime_ns", "rdev", "nlink",
                 "target", "src", "xattrs", "kids")

    def __init__(self, mode: int, uid: int = 0, gid: int = 0, size: int = 0, mtime_ns: int = 0,
                 rdev: int = 0, target: bytes | None = None, src: bytes | None = None,
                 xattrs: dict[bytes, bytes] | None = None,
                 kids: dict[bytes, "LNode"] | None = None) -> None:
        self.ino = 0
        self.mode = mode            # full st_mode (type | permissions)
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime_ns = mtime_ns
        self.rdev = rdev
        self.nlink = 1
        self.target = target        # symlink target
        self.src = src              # absolute host path holding a regular file's content
        self.xattrs = xattrs        # presented xattrs (internal ones removed), or None
        self.kids = kids            # name -> LNode for directories, else None

    def is_dir(self) -> bool:
        return self.kids is not None

    def copy(self) -> "LNode":
        n = LNode(self.mode, self.uid, self.gid, self.size, self.mtime_ns, self.rdev,
                  self.target, self.src, self.xattrs, None)
        return n


def lookup_path(root: LNode, path: bytes | str) -> LNode | None:
    """Node at a slash-separated path below root; shared by the eager and the lazy tree."""
    node = root
    p = os.fsencode(path).strip(b"/")
    if not p:
        return node
    for part in p.split(b"/"):
        if not node.is_dir():
            return None
        node = node.kids.get(part)
        if node is None:
            return None
    return node


def _new_root() -> LNode:
    return LNode(S.S_IFDIR | 0o755, kids={})


class LowerTree:
    """Merged lower layers. Treat as immutable once built (the daemon shares it)."""

    def __init__(self, root: LNode | None = None) -> None:
        self.root = root if root is not None else _new_root()
        self.links: dict[int, list[bytes]] = {}   # ino -> all paths, for st_nlink > 1 files
        self.max_ino = 1
        self.by_ino: list[LNode | None] = []
        if root is None:
            self._finalize()

    # -- queries -------------------------------------------------------------------
    def lookup(self, path: bytes | str) -> LNode | None:
        """Node at a slash-separated path relative to the root (b"" is the root)."""
        return lookup_path(self.root, path)

    def link_paths(self, ln: LNode) -> list[bytes] | None:
        """All merged paths of a hard-linked lower file, or None."""
        return self.links.get(ln.ino)

    def __len__(self) -> int:
        return self.max_ino

    # -- building ------------------------------------------------------------------
    def overlay(self, source: LowerSource) -> "LowerTree":
        """A new tree: this one with one more layer stacked on top (self is unchanged)."""
        t = LowerTree(self._clone_root())
        t._apply(source)
        t._finalize()
        return t

    def _clone_root(self) -> LNode:
        memo: dict[int, LNode] = {}

        def clone(n: LNode) -> LNode:
            c = memo.get(id(n))
            if c is not None:
                return c
            c = n.copy()
            memo[id(n)] = c
            if n.kids is not None:
                c.kids = {k: clone(v) for k, v in n.kids.items()}
            return c
        return clone(self.root)

    def _dir_at(self, path: bytes, create: bool, meta_from: LNode | None = None) -> LNode | None:
        node = self.root
        if not path:
            return node
        for part in path.split(b"/"):
            child = node.kids.get(part)
            if child is None or child.kids is None:
                if not create:
                    return None
                child = LNode(S.S_IFDIR | 0o755, kids={})
                node.kids[part] = child
            node = child
        return node

    def _apply(self, source: LowerSource) -> None:
        data_root = os.fsencode(source.data_root)
        dirs: list[LayerEntry] = []
        others: list[LayerEntry] = []
        hards: list[LayerEntry] = []
        marks = LayerMarks()
        for e, _parent, _name in layer_members(source.entries(), marks):
            if e.kind == "dir":
                dirs.append(e)
            elif e.kind == "hard":
                hards.append(e)
            else:
                others.append(e)
        whiteouts, opaques = marks.whiteouts, marks.opaques
        if marks.root is not None:   # the layer's root directory: its metadata wins
            e, r = marks.root, self.root
            r.mode, r.uid, r.gid, r.mtime_ns = S.S_IFDIR | (e.mode & 0o7777), e.uid, e.gid, e.mtime_ns
            r.xattrs = upperformat.visible_xattrs(e.xattrs) or None
        # 1. whiteouts and opaque markers act on the layers below only
        for parent, name in whiteouts:
            d = self._dir_at(parent, False)
            if d is not None:
                d.kids.pop(name, None)
        for path in opaques:
            d = self._dir_at(path, False)
            if d is not None:
                d.kids = {}
        placed: dict[bytes, LNode] = {}
        # 2. directories, parents first
        dirs.sort(key=lambda e: e.path.count(b"/"))
        for e in dirs:
            path = e.path.strip(b"/")
            parent, _, name = path.rpartition(b"/")
            pd = self._dir_at(parent, True)
            old = pd.kids.get(name)
            n = LNode(S.S_IFDIR | (e.mode & 0o7777), e.uid, e.gid, 0, e.mtime_ns, 0,
                      None, None, upperformat.visible_xattrs(e.xattrs) or None,
                      old.kids if (old is not None and old.kids is not None) else {})
            pd.kids[name] = n
            placed[path] = n
        # 3. everything else
        for e in others:
            path = e.path.strip(b"/")
            parent, _, name = path.rpartition(b"/")
            pd = self._dir_at(parent, True)
            fmt = FMT_OF_KIND.get(e.kind, S.S_IFREG)
            rdev = os.makedev(e.devmajor, e.devminor) if fmt in (S.S_IFCHR, S.S_IFBLK) else 0
            src = None
            if fmt == S.S_IFREG:
                d = e.data if e.data is not None else path
                src = data_root + b"/" + d.lstrip(b"/")
            n = LNode(fmt | (e.mode & 0o7777), e.uid, e.gid, e.size if fmt == S.S_IFREG else
                      (len(e.linkname) if fmt == S.S_IFLNK else 0), e.mtime_ns, rdev,
                      e.linkname if fmt == S.S_IFLNK else None, src,
                      upperformat.visible_xattrs(e.xattrs) or None, None)
            pd.kids[name] = n
            placed[path] = n
        # 4. hard links (target in this layer, else below)
        for e in hards:
            path = e.path.strip(b"/")
            target = e.linkname.strip(b"/")
            t = placed.get(target) or self.lookup(target)
            if t is None or t.kids is not None:
                continue
            parent, _, name = path.rpartition(b"/")
            pd = self._dir_at(parent, True)
            pd.kids[name] = t
            placed[path] = t

    def _finalize(self) -> None:
        """Assign inode numbers (breadth first, root = 1), st_nlink and hard-link groups."""
        root = self.root
        by_ino: list[LNode | None] = [None, root]
        counts: dict[int, list[bytes]] = {}
        root.ino = 1
        seen: set[int] = {id(root)}
        queue: list[tuple[bytes, LNode]] = [(b"", root)]
        i = 0
        while i < len(queue):
            path, d = queue[i]
            i += 1
            subdirs = 0
            for name, n in d.kids.items():
                p = path + b"/" + name if path else name
                if n.kids is not None:
                    subdirs += 1
                    n.ino = len(by_ino)
                    by_ino.append(n)
                    queue.append((p, n))
                    continue
                if id(n) in seen:
                    counts.setdefault(n.ino, []).append(p)
                    continue
                seen.add(id(n))
                n.ino = len(by_ino)
                n.nlink = 1
                by_ino.append(n)
                counts[n.ino] = [p]
            d.nlink = 2 + subdirs
        links = {}
        for ino, paths in counts.items():
            if len(paths) > 1:
                by_ino[ino].nlink = len(paths)
                links[ino] = paths
        self.links = links
        self.by_ino = by_ino
        self.max_ino = len(by_ino) - 1

    # -- persistence ---------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the tree to path atomically (the snapshotter's per-chain cache)."""
        recs = []
        for n in self.by_ino[1:]:
            kids = None
            if n.kids is not None:
                kids = (tuple(n.kids.keys()), tuple(k.ino for k in n.kids.values()))
            recs.append((n.mode, n.uid, n.gid, n.size, n.mtime_ns, n.rdev, n.target, n.src,
                         n.xattrs, kids))
        blob = marshal.dumps((b"fusesnap-lowertree", _FORMAT_VERSION, recs))
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LowerTree | PackedTree":
        """A saved tree: this format, or a PackedTree (what the snapshotter's cache writes)."""
        if is_packed(path):
            return PackedTree.load(path)
        with open(path, "rb") as f:
            data = f.read()
        try:
            magic, version, recs = marshal.loads(data)
        except (ValueError, EOFError, TypeError) as e:
            raise InvalidInput(f"lower tree cache {str(path)!r} is corrupt: {e}") from None
        if magic != b"fusesnap-lowertree" or version != _FORMAT_VERSION:
            raise InvalidInput(f"lower tree cache {str(path)!r} has an unknown format")
        nodes: list[LNode | None] = [None]
        for r in recs:
            n = LNode(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], None)
            nodes.append(n)
        for i, r in enumerate(recs, 1):
            kids = r[9]
            if kids is not None:
                names, inos = kids
                nodes[i].kids = dict(zip(names, [nodes[j] for j in inos]))
        t = cls.__new__(cls)
        t.root = nodes[1]
        t._finalize()
        return t


def build_lower_tree(lowers: Sequence[LowerSource]) -> LowerTree:
    """Merge lowers (top-most first, like lowerdir=) into one LowerTree."""
    t = LowerTree(_new_root())
    for src in reversed(list(lowers)):
        t._apply(src)
    t._finalize()
    return t


def lower_tree_from_dirs(dirs: Iterable[str | os.PathLike]) -> LowerTree:
    return build_lower_tree([DirLower(d) for d in dirs])
