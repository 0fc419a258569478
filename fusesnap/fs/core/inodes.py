"""Runtime objects of a mounted union: one Inode per object the kernel may know.

Inode numbers come from the lower tree (stable for the life of the mount and
across copy-up; hard links share one) or, for objects created in the upper,
from a counter above the lower tree's range.
"""

from __future__ import annotations

import stat as S

from fusesnap.fs.core.lowertree import LNode


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
        self.attr = None               # cached pyfuse3.EntryAttributes for lower objects
        self.lookups = 0
        self.busy = None               # trio.Event while a copy-up is running
        # writeback cache: (atime, mtime) of the kernel's last SETATTR of the mtime,
        # which later WRITEs of the same file put back on the host
        self.kernel_times: tuple[int, int] | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind == S.S_IFDIR

    def path(self) -> bytes:
        """Path relative to the upper root (b'.' for the root)."""
        if self.parent is None and self.ino != 1:
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
        if self.parent is None and self.name == b"" and self.ino != 1:
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
