"""Runtime objects of a mounted union: one Inode per object the kernel may know.

Inode numbers come from the lower tree (stable for the life of the mount and
across copy-up; hard links share one) or, for objects created in the upper,
from a counter above the lower tree's range.
"""

from __future__ import annotations

import errno
import stat as S
from typing import Any

from fusesnap.fs.core.attrs import ROOT_INO
from fusesnap.fs.core.errs import err
from fusesnap.fs.core.lowertree import LNode, LowerTree


class Inode:
    __slots__ = ("ino", "kind", "lower", "upper", "parent", "name", "extra", "kids", "wh",
                 "opaque", "nlink", "attr", "lookups", "busy", "kernel_times")

    def __init__(self, ino: int, kind: int, lower: LNode | None, upper: bool,
                 parent: "Inode | None", name: bytes) -> None:
        self.ino = ino
        self.kind = kind               # S_IFMT bits; never changes
        self.lower = lower             # lower object (content/metadata source until copy-up)
        self.upper = upper             # True once the object exists in the upper dir
        self.parent = parent           # primary name: parent directory and name
        self.name = name
        self.extra: list[tuple[Inode, bytes]] | None = None   # further hard-link names
        self.kids: dict[bytes, Inode] | None = None           # directories: merged entries, lazily
        self.wh: set[bytes] | None = None   # directories: names whited out in the upper
        self.opaque = False            # directories: lower entries hidden
        self.nlink = lower.nlink if lower is not None and kind != S.S_IFDIR else 1
        self.attr: Any = None          # cached attribute record (lower objects; nameless ones)
        self.lookups = 0
        self.busy: Any = None          # the FUSE layer's event while a copy-up runs off its loop
        # writeback cache: (atime, mtime) of the kernel's last SETATTR of the mtime,
        # which later WRITEs of the same file put back on the host
        self.kernel_times: tuple[int, int] | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind == S.S_IFDIR

    def path(self) -> bytes:
        """Path relative to the upper root (b'.' for the root)."""
        if self.parent is None and self.ino != ROOT_INO:
            raise FileNotFoundError(2, "object has no name any more")
        parts = []
        n = self
        while n.parent is not None:
            parts.append(n.name)
            n = n.parent
        if not parts:
            return b"."
        parts.reverse()
        return b"/".join(parts)

    def names(self) -> list[tuple["Inode", bytes]]:
        out = [] if self.parent is None and not self.name else [(self.parent, self.name)]
        if self.extra:
            out.extend(self.extra)
        return out

    def add_name(self, parent: "Inode", name: bytes) -> None:
        if self.parent is None and self.name == b"" and self.ino != ROOT_INO:
            self.parent, self.name = parent, name
            return
        if self.parent is parent and self.name == name:
            return
        if self.extra is None:
            self.extra = []
        if (parent, name) not in self.extra:
            self.extra.append((parent, name))

    def drop_name(self, parent: "Inode", name: bytes) -> None:
        if self.parent is parent and self.name == name:
            if self.extra:
                self.parent, self.name = self.extra.pop(0)
            else:
                self.parent, self.name = None, b""
        elif self.extra:
            try:
                self.extra.remove((parent, name))
            except ValueError:
                pass

    def __repr__(self) -> str:
        return f"<Inode {self.ino} {self.path()!r} upper={self.upper}>"


class InodeTable:
    """Every object the kernel may know, by inode number.

    Numbers come from the lower tree (a lazy tree hands them out as it grows)
    or, for objects made in the upper, from a counter above the tree's range."""

    __slots__ = ("by_ino", "root", "next_ino", "_tree_ino", "upper_links")

    def __init__(self, tree: LowerTree, root: Inode) -> None:
        self.by_ino: dict[int, Inode] = {ROOT_INO: root}
        self.root = root
        self.next_ino = tree.max_ino + 1
        self._tree_ino = getattr(tree, "new_ino", None)
        # upper hard-link groups: host inode number -> the view's inode
        self.upper_links: dict[int, Inode] = {}

    def get(self, ino: int) -> Inode:
        i = self.by_ino.get(ino)
        if i is None:
            raise err(errno.ESTALE)
        return i

    def new_ino(self) -> int:
        if self._tree_ino is not None:
            return self._tree_ino()
        n = self.next_ino
        self.next_ino += 1
        return n

    def add(self, i: Inode) -> Inode:
        self.by_ino[i.ino] = i
        return i

    def new_upper(self, d: Inode, name: bytes, kind: int) -> Inode:
        """A fresh object made in the upper below d (not yet entered in d's kids)."""
        return self.add(Inode(self.new_ino(), kind, None, True, d, name))

    def lower(self, ln: LNode, d: Inode, name: bytes) -> Inode:
        """The inode of lower object ln, reached as d/name (hard links share one)."""
        i = self.by_ino.get(ln.ino)
        if i is None or i.lower is not ln:
            i = Inode(ln.ino, S.S_IFMT(ln.mode), ln, False, d, name)
            self.by_ino[ln.ino] = i
        else:
            i.add_name(d, name)
        return i

    def forget(self, ino: int, n: int) -> bool:
        """The kernel dropped n references; True when a nameless object is gone for good."""
        i = self.by_ino.get(ino)
        if i is None or ino == ROOT_INO:
            return False
        i.lookups -= n
        if i.lookups <= 0 and i.parent is None:
            del self.by_ino[ino]
            return True
        return False
