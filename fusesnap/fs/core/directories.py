"""The merged namespace: which object each name of a directory leads to.

A directory's entries are merged once, on first use: the lower tree's (never
changing) entries, then its upper directory's, whose whiteouts hide lower
names and whose opaque marker hides them all. From then on every change goes
through this daemon, which keeps the merged dict current.
"""

from __future__ import annotations

import errno
import os
import stat as S

from fusesnap.fs.core import upperformat
from fusesnap.fs.core.errs import err
from fusesnap.fs.core.inodes import Inode, InodeTable
from fusesnap.fs.core.listing import Listing
from fusesnap.fs.core.upperdir import UpperDir

NAME_MAX = 255


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise err(errno.ENAMETOOLONG)


class Directories:
    __slots__ = ("table", "upper", "override_names", "listings")

    def __init__(self, table: InodeTable, upper: UpperDir,
                 override_names: tuple[bytes, ...] | None) -> None:
        self.table = table
        self.upper = upper
        # the override xattrs to read on upper files (None: the host's stat is the truth)
        self.override_names = override_names
        self.listings: dict[int, Listing] = {}   # dir ino -> entries with stable offsets

    def kids(self, d: Inode) -> dict[bytes, Inode]:
        k = d.kids
        if k is None:
            if not d.is_dir:
                raise err(errno.ENOTDIR)
            k = self._load(d)
        return k

    def lookup(self, d: Inode, name: bytes) -> Inode | None:
        k = d.kids
        if k is None:
            k = self.kids(d)
        i = k.get(name)
        if i is None:
            if name == b".":
                return d
            if name == b"..":
                return d.parent or d
            if len(name) > NAME_MAX:
                raise err(errno.ENAMETOOLONG)
        return i

    @staticmethod
    def lower_has(d: Inode, name: bytes) -> bool:
        """Would NAME show through from the lowers if the upper had nothing there?"""
        low = d.lower
        return low is not None and not d.opaque and low.kids is not None and name in low.kids

    def resolve(self, path: bytes) -> tuple[Inode | None, Inode | None, bytes]:
        """(object, parent, last name) of a path from the root; (None, None, b"") if a
        directory on the way is missing."""
        d = self.table.root
        parts = path.split(b"/")
        for part in parts[:-1]:
            n = self.kids(d).get(part)
            if n is None or not n.is_dir:
                return None, None, b""
            d = n
        return self.kids(d).get(parts[-1]), d, parts[-1]

    def listing(self, d: Inode, restart: bool) -> Listing:
        """d's entries with offsets that stay valid for the life of the mount.

        ``restart`` (a read from offset 0) appends entries added since the last
        restart; removed ones are skipped when read."""
        li = self.listings.get(d.ino)
        if li is None or li.d is not d:
            li = self.listings[d.ino] = Listing(d, self.kids(d))
            listed = getattr(d.lower, "listed", None) if not d.opaque else None
            if listed is not None:
                listed()        # a lazy lower tree's hint (lazytree.LazyDir.listed)
        elif restart:
            li.sync(self.kids(d))
        return li

    def forget(self, ino: int) -> None:
        self.listings.pop(ino, None)

    # ------------------------------------------------------------ merging one directory
    @staticmethod
    def _hide(d: Inode, kids: dict[bytes, Inode], wh: set[bytes] | None, name: bytes) -> set[bytes]:
        """An upper whiteout for NAME: it hides the lower entry and is remembered (lazily made set)."""
        if wh is None:
            wh = set()
        wh.add(name)
        old = kids.pop(name, None)
        if old is not None:
            old.drop_name(d, name)
        return wh

    def _load(self, d: Inode) -> dict[bytes, Inode]:
        table = self.table
        kids: dict[bytes, Inode] = {}
        low = d.lower if not d.opaque else None
        upath = None
        if d.upper:
            upath = self.upper.path(d)
            if low is not None and d is not table.root and upperformat.is_opaque(upath):
                d.opaque = True
                low = None
        if low is not None:
            li = table.lower
            inodes = table.by_ino
            for name, ln in low.kids.items():
                if ln.ino in inodes:
                    kids[name] = li(ln, d, name)
                else:       # first sight (the common case): no lookup in table.lower
                    i = inodes[ln.ino] = Inode(ln.ino, ln.mode & 0o170000, ln, False, d, name)
                    kids[name] = i
        if upath is not None:
            self._merge_upper(d, upath, kids)
        d.kids = kids
        return kids

    def _merge_upper(self, d: Inode, upath: bytes, kids: dict[bytes, Inode]) -> None:
        table = self.table
        upper_links = table.upper_links
        override_names = self.override_names
        wh: set[bytes] | None = None
        with os.scandir(upath) as it:
            for de in it:
                name = de.name
                if name.startswith(b".wh."):
                    if name == upperformat.OPQ_NAME:
                        continue
                    wh = self._hide(d, kids, wh, name[4:])
                    continue
                st = None
                if de.is_dir(follow_symlinks=False):
                    kind = S.S_IFDIR
                elif de.is_file(follow_symlinks=False):
                    kind = S.S_IFREG
                elif de.is_symlink():
                    kind = S.S_IFLNK
                else:
                    st = de.stat(follow_symlinks=False)
                    if S.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                        wh = self._hide(d, kids, wh, name)
                        continue
                    kind = S.S_IFMT(st.st_mode)
                if kind == S.S_IFREG and override_names is not None:
                    ov = upperformat.read_override(de.path, override_names)
                    if ov is not None and ov.fmt is not None and ov.fmt != kind:
                        if ov.fmt == S.S_IFCHR and ov.rdev == 0:
                            wh = self._hide(d, kids, wh, name)
                            continue
                        kind = ov.fmt
                if kind != S.S_IFDIR and st is None:
                    st = de.stat(follow_symlinks=False)
                old = kids.get(name)
                if old is not None:
                    if old.upper:
                        continue
                    if kind == S.S_IFDIR and old.is_dir:
                        old.upper = True
                        old.attr = None
                        continue
                    if kind == old.kind and kind != S.S_IFDIR and old.lower is not None \
                            and old.lower.nlink == 1:
                        # copied up by an earlier mount: keep the lower's inode number
                        j = upper_links.get(st.st_ino) if st.st_nlink > 1 else None
                        if j is None:
                            if st.st_nlink > 1:
                                upper_links[st.st_ino] = old
                            old.upper = True
                            old.attr = None
                            continue
                    old.drop_name(d, name)
                if kind != S.S_IFDIR and st.st_nlink > 1:
                    i = upper_links.get(st.st_ino)
                    if i is not None and i.upper:
                        i.add_name(d, name)
                        kids[name] = i
                        continue
                i = table.new_upper(d, name, kind)
                if kind == S.S_IFDIR:
                    i.opaque = True      # upper-only directory: nothing below it
                elif st is not None and st.st_nlink > 1:
                    upper_links[st.st_ino] = i
                    i.nlink = st.st_nlink
                kids[name] = i
        d.wh = wh
