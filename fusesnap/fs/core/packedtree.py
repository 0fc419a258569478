"""A merged lower tree in flat arrays, for store mounts of layers with millions of entries.

LowerTree keeps one Python object per entry (its LNode, name, absolute source
path and integers): 700-1000 bytes each. This tree keeps the same facts in
arrays indexed by inode number, names in one sorted blob per directory range and
the rare facts (device numbers, symlink targets, xattrs, hard-link groups, data
paths that are not the entry's own) in dicts: ~70 bytes per entry in the daemon
(docs/BENCHMARKS.md, "Memory per entry"), ~150 more for each entry the kernel
has looked at. Nodes are made on demand as PNode objects with LNode's
attributes, one per inode, so the union sees the same interface (`kids` is a
read-only mapping).

TreeBuilder merges layers bottom first in one pass over each layer's entries:
the layer is read into a tree of its own, then its whiteouts and opaque markers
act on what lies below and its entries are grafted on (the rules of
LowerTree._apply; tests/unit/test_fs_packedtree.py checks both give the same
trees). The cache file holds the arrays raw, so loading costs one copy.
"""

from __future__ import annotations

import array
import marshal
import os
import stat as S
import struct
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fusesnap.errors import InvalidInput
from fusesnap.fs.core import upperformat
from fusesnap.fs.core.lower import LayerMarks, LowerSource, layer_members
from fusesnap.layerentry import FMT_OF_KIND

MAGIC = b"fusesnap-packedtree\n"
VERSION = 1
_DIR = S.S_IFDIR | 0o755
_MTIME_MAX = (1 << 63) - 1

# per-inode arrays: name, typecode
_NODE_ARRAYS = (("mode", "I"), ("uid", "I"), ("gid", "I"), ("size", "q"), ("mtime", "q"), ("nlink", "I"),
                ("kid_start", "I"), ("kid_count", "I"), ("parent", "I"), ("edge", "I"), ("layer", "H"))
_EDGE_ARRAYS = (("kid_ino", "I"), ("name_off", "I"))


def _clamp(t: int) -> int:
    return max(-_MTIME_MAX, min(t, _MTIME_MAX))


class TreeBuilder:
    """Layers merged into node arrays and one dict (name -> node) per directory."""

    def __init__(self) -> None:
        self.mode = array.array("I")
        self.uid = array.array("I")
        self.gid = array.array("I")
        self.size = array.array("q")
        self.mtime = array.array("q")
        self.layer = array.array("H")
        self.kids: list[dict[bytes, int] | None] = []
        # where a hard-linked file was created (its data path, unless `data` says otherwise): a
        # node with one name is at the path it was created at, one with several may be met first
        # at another name, or lose its first one to a whiteout
        self.home: dict[int, bytes] = {}
        self.rdev: dict[int, int] = {}
        self.target: dict[int, bytes] = {}
        self.xattrs: dict[int, dict[bytes, bytes]] = {}
        self.data: dict[int, bytes] = {}  # data path (relative to the layer's root) when not `home`
        self.roots: list[bytes] = []
        self.root = self._node(_DIR, 0, 0, 0, 0, 0, {})

    def _node(self, mode: int, uid: int, gid: int, size: int, mtime: int, layer: int,
              kids: dict[bytes, int] | None) -> int:
        i = len(self.mode)
        self.mode.append(mode)
        self.uid.append(uid)
        self.gid.append(gid)
        self.size.append(size)
        self.mtime.append(_clamp(mtime))
        self.layer.append(layer)
        self.kids.append(kids)
        return i

    # -- one layer -------------------------------------------------------------------
    def _walk(self, top: int, path: bytes, implicit: set[int] | None, layer: int = 0) -> int | None:
        """The directory at path below `top`; with `implicit` (this layer's tree), missing or
        non-directory components become plain directories, remembered in it."""
        node = top
        if not path:
            return node
        for part in path.split(b"/"):
            k = self.kids[node]
            child = k.get(part)
            if child is None or self.kids[child] is None:
                if implicit is None:
                    return None
                child = self._node(_DIR, 0, 0, 0, 0, layer, {})
                implicit.add(child)
                k[part] = child
            node = child
        return node

    def _find(self, top: int, path: bytes) -> int | None:
        parent, _, name = path.rpartition(b"/")
        d = self._walk(top, parent, None)
        return None if d is None else self.kids[d].get(name)

    def apply(self, source: LowerSource) -> None:
        """Stack one more layer on top (entries in any order, read once)."""
        L = len(self.roots)
        self.roots.append(os.fsencode(source.data_root))
        local = self._node(_DIR, 0, 0, 0, 0, L, {})
        implicit: set[int] = set()
        cross: list[tuple[bytes, bytes]] = []  # hard links to something below this layer
        marks = LayerMarks()
        for e, parent, name in layer_members(source.entries(), marks):
            path = e.path.strip(b"/")
            pd = self.kids[self._walk(local, parent, implicit, L)]  # type: ignore[index]
            xattrs = upperformat.visible_xattrs(e.xattrs) if e.xattrs else None
            if e.kind == "dir":
                old = pd.get(name)
                kids = self.kids[old] if old is not None and self.kids[old] is not None else {}
                n = self._node(S.S_IFDIR | (e.mode & 0o7777), e.uid, e.gid, 0, e.mtime_ns, L, kids)
                if xattrs:
                    self.xattrs[n] = xattrs
                pd[name] = n
            elif e.kind == "hard":
                target = e.linkname.strip(b"/")
                t = self._find(local, target)
                if t is None:
                    cross.append((path, target))
                elif self.kids[t] is None:
                    self.home.setdefault(t, target)
                    pd[name] = t
            else:
                fmt = FMT_OF_KIND.get(e.kind, S.S_IFREG)
                reg = fmt == S.S_IFREG
                size = e.size if reg else (len(e.linkname) if fmt == S.S_IFLNK else 0)
                n = self._node(fmt | (e.mode & 0o7777), e.uid, e.gid, size, e.mtime_ns, L, None)
                if reg and e.data is not None and e.data.lstrip(b"/") != path:
                    self.data[n] = e.data.lstrip(b"/")
                if fmt in (S.S_IFCHR, S.S_IFBLK):
                    self.rdev[n] = os.makedev(e.devmajor, e.devminor)
                elif fmt == S.S_IFLNK:
                    self.target[n] = e.linkname
                if xattrs:
                    self.xattrs[n] = xattrs
                pd[name] = n
        # whiteouts and opaque markers act on the layers below only
        for parent, name in marks.whiteouts:
            d = self._walk(self.root, parent, None)
            if d is not None:
                self.kids[d].pop(name, None)  # type: ignore[union-attr]
        for path in marks.opaques:
            d = self._walk(self.root, path, None)
            if d is not None:
                self.kids[d] = {}
        root_meta = marks.root
        if root_meta is not None:
            r = self.root
            self.mode[r] = S.S_IFDIR | (root_meta.mode & 0o7777)
            self.uid[r], self.gid[r], self.mtime[r] = root_meta.uid, root_meta.gid, _clamp(root_meta.mtime_ns)
            self.xattrs.pop(r, None)
            if root_meta.xattrs and upperformat.visible_xattrs(root_meta.xattrs):
                self.xattrs[r] = upperformat.visible_xattrs(root_meta.xattrs)
        self._graft(local, implicit)
        for path, target in cross:
            t = self._find(self.root, target)
            if t is None or self.kids[t] is not None:
                continue
            parent, _, name = path.rpartition(b"/")
            pd = self.kids[self._walk(self.root, parent, set(), L)]  # type: ignore[index]
            self.home.setdefault(t, target)
            pd[name] = t

    def _graft(self, local: int, implicit: set[int]) -> None:
        """Put this layer's tree over the tree below: its directories merge with directories
        there (its listed ones bringing their metadata), everything else replaces."""
        stack = [(self.root, local)]
        while stack:
            below, mine = stack.pop()
            bk = self.kids[below]
            for name, n in self.kids[mine].items():  # type: ignore[union-attr]
                old = bk.get(name)  # type: ignore[union-attr]
                if self.kids[n] is not None and old is not None and self.kids[old] is not None:
                    if n not in implicit:  # the layer lists this directory: its metadata
                        for a in (self.mode, self.uid, self.gid, self.mtime, self.layer):
                            a[old] = a[n]
                        self.xattrs.pop(old, None)
                        if n in self.xattrs:
                            self.xattrs[old] = self.xattrs[n]
                    stack.append((old, n))
                else:
                    bk[name] = n  # type: ignore[index]

    # -- to and from the packed form -----------------------------------------------------
    @classmethod
    def from_packed(cls, t: "PackedTree") -> "TreeBuilder":
        """A builder holding a packed tree (to stack more layers on it)."""
        b = cls.__new__(cls)
        n = t.max_ino + 1
        b.mode, b.uid, b.gid = array.array("I", t.mode), array.array("I", t.uid), array.array("I", t.gid)
        b.size, b.mtime, b.layer = array.array("q", t.size), array.array("q", t.mtime), array.array("H", t.layer)
        b.roots = list(t.roots)
        b.rdev, b.target, b.xattrs = dict(t.rdev), dict(t.target), dict(t.xattrs)
        b.data = dict(t.dpath)
        b.home = {ino: t.path_of(ino) for ino in t.links if ino not in t.dpath}
        b.kids = [None] * n
        for ino in range(1, n):
            if S.S_ISDIR(t.mode[ino]):
                s, c = t.kid_start[ino], t.kid_count[ino]
                b.kids[ino] = {t.edge_name(k): t.kid_ino[k] for k in range(s, s + c)}
        b.root = 1
        return b

    def pack(self) -> "PackedTree":
        """The finished tree: inode numbers breadth first (root 1), names sorted per directory.

        Consumes the builder (its directories are freed as they are packed, so the peak is
        about the builder's size, not the builder's plus the tree's)."""
        t = PackedTree.__new__(PackedTree)
        for name, code in _NODE_ARRAYS:
            setattr(t, name, array.array(code, [0]))
        t.kid_ino = array.array("I")
        t.name_off = array.array("I")
        names = bytearray()
        t.rdev, t.target, t.xattrs, t.dpath, t.links = {}, {}, {}, {}, {}
        t.roots = tuple(self.roots)
        ino_of = array.array("I", bytes(4 * len(self.mode)))  # builder node -> inode (0: not yet)

        def add(node: int, parent: int, edge: int) -> int:
            ino = len(t.mode)
            ino_of[node] = ino
            t.mode.append(self.mode[node])
            t.uid.append(self.uid[node])
            t.gid.append(self.gid[node])
            t.size.append(self.size[node])
            t.mtime.append(self.mtime[node])
            t.nlink.append(1)
            t.kid_start.append(0)
            t.kid_count.append(0)
            t.parent.append(parent)
            t.edge.append(edge)
            t.layer.append(self.layer[node])
            for src, dst in ((self.rdev, t.rdev), (self.target, t.target), (self.xattrs, t.xattrs)):
                v = src.get(node)
                if v is not None:
                    dst[ino] = v
            return ino

        add(self.root, 0, 0)
        queue: list[tuple[int, bytes]] = [(self.root, b"")]
        qi = 0
        while qi < len(queue):
            d, dpath = queue[qi]
            queue[qi] = (0, b"")
            qi += 1
            dino = ino_of[d]
            items = sorted(self.kids[d].items())  # type: ignore[union-attr]
            self.kids[d] = {}  # packed: free its dict (it stays a directory for the checks below)
            t.kid_start[dino] = len(t.kid_ino)
            t.kid_count[dino] = len(items)
            subdirs = 0
            for name, n in items:
                edge = len(t.kid_ino)
                t.name_off.append(len(names))
                names += name
                p = dpath + b"/" + name if dpath else name
                ino = ino_of[n]
                if ino:  # a hard link to a node met before
                    t.nlink[ino] += 1
                    if ino not in t.links:
                        t.links[ino] = [t.path_of_edges(ino, names)]
                    t.links[ino].append(p)
                else:
                    ino = add(n, dino, edge)
                    if self.kids[n] is not None:
                        subdirs += 1
                        queue.append((n, p))
                    elif S.S_ISREG(self.mode[n]):
                        data = self.data.get(n) or self.home.get(n) or p
                        if data != p:
                            t.dpath[ino] = data
                t.kid_ino.append(ino)
            t.nlink[dino] = 2 + subdirs
        t.name_off.append(len(names))
        t.names = bytes(names)
        t._setup()
        return t


class KidsView(Mapping):
    """A packed directory's entries, name -> PNode (read-only, sorted by name)."""

    __slots__ = ("_t", "_s", "_n")

    def __init__(self, tree: "PackedTree", start: int, count: int) -> None:
        self._t, self._s, self._n = tree, start, count

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[bytes]:
        names, off = self._t.names, self._t.name_off
        s = self._s
        o0 = off[s]
        for k in range(s + 1, s + self._n + 1):
            o1 = off[k]
            yield names[o0:o1]
            o0 = o1

    def _index(self, key: bytes) -> int:
        t = self._t
        lo, hi = self._s, self._s + self._n
        while lo < hi:
            mid = (lo + hi) // 2
            if t.edge_name(mid) < key:
                lo = mid + 1
            else:
                hi = mid
        if lo < self._s + self._n and t.edge_name(lo) == key:
            return lo
        return -1

    def __getitem__(self, key: bytes) -> "PNode":
        k = self._index(key) if isinstance(key, bytes) else -1
        if k < 0:
            raise KeyError(key)
        return self._t.node(self._t.kid_ino[k])

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self._index(key) >= 0

    def items(self) -> Iterator[tuple[bytes, "PNode"]]:  # type: ignore[override]
        t = self._t
        names, off, kid, nodes = t.names, t.name_off, t.kid_ino, t._nodes
        s = self._s
        o0 = off[s]
        for k in range(s, s + self._n):
            o1 = off[k + 1]
            ino = kid[k]
            n = nodes[ino]
            if n is None:
                n = nodes[ino] = PNode(t, ino)
            yield names[o0:o1], n
            o0 = o1

    def values(self) -> Iterator["PNode"]:  # type: ignore[override]
        t = self._t
        kid, node = t.kid_ino, t.node
        for k in range(self._s, self._s + self._n):
            yield node(kid[k])


class PNode:
    """One node of a PackedTree, with LNode's attributes (hard links share one). Made when
    looked at; the attributes every request reads are copied in, the rare ones read from
    the tree when asked for."""

    __slots__ = ("_t", "ino", "mode", "uid", "gid", "size", "mtime_ns", "nlink", "rdev")

    def __init__(self, t: "PackedTree", ino: int) -> None:
        self._t = t
        self.ino = ino
        self.mode = t.mode[ino]
        self.uid = t.uid[ino]
        self.gid = t.gid[ino]
        self.size = t.size[ino]
        self.mtime_ns = t.mtime[ino]
        self.nlink = t.nlink[ino]
        self.rdev = t.rdev.get(ino, 0)

    @property
    def target(self) -> bytes | None:
        return self._t.target.get(self.ino)

    @property
    def xattrs(self) -> dict[bytes, bytes] | None:
        return self._t.xattrs.get(self.ino)

    @property
    def kids(self) -> KidsView | None:
        if not S.S_ISDIR(self.mode):
            return None
        t, ino = self._t, self.ino
        return KidsView(t, t.kid_start[ino], t.kid_count[ino])

    @property
    def src(self) -> bytes | None:
        """Absolute host path of a regular file's content."""
        if not S.S_ISREG(self.mode):
            return None
        t, ino = self._t, self.ino
        data = t.dpath.get(ino)
        if data is None:
            data = t.path_of(ino)
        return t.roots[t.layer[ino]] + b"/" + data

    def is_dir(self) -> bool:
        return S.S_ISDIR(self.mode)


class PackedTree:
    """Merged lower layers in arrays (see the module doc); the LowerTree query interface."""

    mode: array.array
    uid: array.array
    gid: array.array
    size: array.array
    mtime: array.array
    nlink: array.array
    kid_start: array.array
    kid_count: array.array
    parent: array.array
    edge: array.array
    layer: array.array
    kid_ino: array.array
    name_off: array.array
    names: bytes
    roots: tuple[bytes, ...]
    rdev: dict[int, int]
    target: dict[int, bytes]
    xattrs: dict[int, dict[bytes, bytes]]
    dpath: dict[int, bytes]
    links: dict[int, list[bytes]]

    def _setup(self) -> None:
        # inode -> its PNode once made: the union tells nodes apart by identity, so there is
        # one per inode; kept (8 bytes a slot, ~50 more per node made) because making them
        # again, or tracking them weakly, costs more than the rest of a directory listing
        self._nodes: list[PNode | None] = [None] * len(self.mode)
        self.max_ino = len(self.mode) - 1
        self.root = self.node(1)

    # -- queries -------------------------------------------------------------------
    def node(self, ino: int) -> PNode:
        n = self._nodes[ino]
        if n is None:
            n = self._nodes[ino] = PNode(self, ino)
        return n

    def edge_name(self, k: int) -> bytes:
        off = self.name_off
        return self.names[off[k]:off[k + 1]]

    def path_of(self, ino: int) -> bytes:
        """The first (breadth-first) path of a node."""
        parts = []
        while ino > 1:
            parts.append(self.edge_name(self.edge[ino]))
            ino = self.parent[ino]
        return b"/".join(reversed(parts))

    def path_of_edges(self, ino: int, names: bytearray) -> bytes:
        """path_of while packing (the names blob is still growing)."""
        off = self.name_off
        parts = []
        while ino > 1:
            k = self.edge[ino]
            parts.append(bytes(names[off[k]:off[k + 1]]))
            ino = self.parent[ino]
        return b"/".join(reversed(parts))

    def lookup(self, path: bytes | str) -> PNode | None:
        node: PNode | None = self.root
        p = os.fsencode(path).strip(b"/")
        if not p:
            return node
        for part in p.split(b"/"):
            if node is None or node.kids is None:
                return None
            node = node.kids.get(part)
        return node

    def link_paths(self, ln: Any) -> list[bytes] | None:
        """All merged paths of a hard-linked lower file, or None."""
        return self.links.get(ln.ino)

    def __len__(self) -> int:
        return self.max_ino

    def overlay(self, source: LowerSource) -> "PackedTree":
        """A new tree: this one with one more layer stacked on top (self is unchanged)."""
        b = TreeBuilder.from_packed(self)
        b.apply(source)
        return b.pack()

    # -- persistence ---------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the tree to path atomically (owner-only): a header, then the arrays raw."""
        sections = [getattr(self, n) for n, _ in _NODE_ARRAYS + _EDGE_ARRAYS]
        header = marshal.dumps({"version": VERSION, "lengths": [len(a) for a in sections],
                                "names": len(self.names), "roots": self.roots, "rdev": self.rdev,
                                "target": self.target, "xattrs": self.xattrs, "dpath": self.dpath,
                                "links": self.links, "byteorder": sys.byteorder})
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(header)) + header)
            for a in sections:
                f.write(memoryview(a).cast("B"))
            f.write(self.names)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PackedTree":
        t = cls.__new__(cls)
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise InvalidInput(f"lower tree cache {str(path)!r} is not a packed tree")
            try:
                (hlen,) = struct.unpack("<Q", f.read(8))
                h = marshal.loads(f.read(hlen))
                if h["version"] != VERSION or h["byteorder"] != sys.byteorder:
                    raise InvalidInput(f"lower tree cache {str(path)!r} has an unknown format")
                for (name, code), n in zip(_NODE_ARRAYS + _EDGE_ARRAYS, h["lengths"]):
                    a = array.array(code, bytes(n * array.array(code).itemsize))
                    if f.readinto(memoryview(a).cast("B")) != n * a.itemsize:
                        raise InvalidInput(f"lower tree cache {str(path)!r} is truncated")
                    setattr(t, name, a)
                t.names = f.read(h["names"])
                if len(t.names) != h["names"]:
                    raise InvalidInput(f"lower tree cache {str(path)!r} is truncated")
            except (ValueError, EOFError, TypeError, KeyError, struct.error) as e:
                raise InvalidInput(f"lower tree cache {str(path)!r} is corrupt: {e}") from None
        t.roots = tuple(h["roots"])
        t.rdev, t.target, t.xattrs, t.dpath, t.links = h["rdev"], h["target"], h["xattrs"], h["dpath"], h["links"]
        t._setup()
        return t


def is_packed(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def build_packed_tree(lowers: list[LowerSource]) -> PackedTree:
    """Merge lowers (top-most first, like lowerdir=) into a PackedTree."""
    b = TreeBuilder()
    for src in reversed(lowers):
        b.apply(src)
    return b.pack()
