"""Attributes as the view shows them.

Lower objects: from the lower tree, built once and cached on the inode (they
never change). Upper objects: from a host stat, with the override xattr applied
where the daemon could not give the host object its presented owner, mode or
type, and ids mapped (fs/core/ids.py).
"""

from __future__ import annotations

import os
import stat as S
from typing import Any, Callable

from fusesnap.fs.core import upperformat
from fusesnap.fs.core.attrs import ROOT_INO, AttrFactory
from fusesnap.fs.core.ids import IdView
from fusesnap.fs.core.inodes import Inode
from fusesnap.fs.core.upperdir import UpperDir
from fusesnap.fs.options import MountOptions


def host_stat(target: int | bytes) -> os.stat_result:
    """stat of a host object by fd or by path (never through a symlink)."""
    return os.fstat(target) if isinstance(target, int) else os.lstat(target)


class OverrideXattrs:
    """Which xattr records presented metadata, and which ones are read back."""

    __slots__ = ("write_name", "read_names")

    def __init__(self, opts: MountOptions, privileged: bool) -> None:
        self.write_name = upperformat.XATTR_PERMISSIONS_NAMES[opts.xattr_permissions]
        # root applies owners and modes to the host for real (and so needs no
        # override xattrs) unless told to keep them in an xattr
        reads = (not privileged) or opts.xattr_permissions != 0
        self.read_names: tuple[bytes, ...] | None = (
            (self.write_name,) + tuple(n for n in upperformat.OVERRIDE_XATTRS if n != self.write_name)
            if reads else None)


class Presenter:
    __slots__ = ("opts", "ids", "make_attr", "upper", "overrides", "kids", "timeout")

    def __init__(self, opts: MountOptions, ids: IdView, make_attr: AttrFactory, upper: UpperDir,
                 overrides: OverrideXattrs, kids: Callable[[Inode], dict[bytes, Inode]]) -> None:
        self.opts = opts
        self.ids = ids
        self.make_attr = make_attr
        self.upper = upper
        self.overrides = overrides
        self.kids = kids              # a merged directory's entries (its link count counts them)
        self.timeout = float(opts.timeout)

    def attr(self, i: Inode, st: os.stat_result | None = None) -> Any:
        """The view's attributes; st: a host stat of the upper object taken just now."""
        if not i.upper:
            a = i.attr
            if a is None:
                a = i.attr = self._lower_attr(i)
            return a
        return self.upper_attr(i, st)

    def host_stat(self, i: Inode) -> os.stat_result:
        return host_stat(self.upper.target(i))

    def presented(self, i: Inode, st: os.stat_result | None = None) -> upperformat.Presented:
        """Mode/owner/rdev the view shows for an upper object (override xattr applied)."""
        if st is None:
            st = self.host_stat(i)
        ov = None
        names = self.overrides.read_names
        if names is not None and not S.S_ISLNK(st.st_mode):
            try:
                ov = upperformat.read_override(self.upper.target(i), names)
            except OSError:
                ov = None
        return upperformat.presented_stat(st, ov)

    def _fill_common(self, a: Any, mode: int, uid: int, gid: int) -> None:
        a.st_mode = mode
        ids = self.ids
        if ids.plain:
            a.st_uid = uid
            a.st_gid = gid
        else:
            a.st_uid = ids.shown_uid(uid)
            a.st_gid = ids.shown_gid(gid)
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout

    def _lower_attr(self, i: Inode) -> Any:
        ln = i.lower
        a = self.make_attr()
        a.st_ino = i.ino
        self._fill_common(a, ln.mode, ln.uid, ln.gid)
        if i.kind == S.S_IFDIR:
            a.st_nlink = 1 if self.opts.static_nlink else ln.nlink
            a.st_size = 4096
            a.st_blocks = 8
        else:
            a.st_nlink = i.nlink
            a.st_size = ln.size
            a.st_blocks = (ln.size + 511) // 512
        a.st_rdev = ln.rdev
        t = ln.mtime_ns
        a.st_atime_ns = t
        a.st_mtime_ns = t
        a.st_ctime_ns = t
        return a

    def upper_attr(self, i: Inode, st: os.stat_result | None = None) -> Any:
        if i.parent is None and i.ino != ROOT_INO and i.attr is not None:
            return i.attr          # gone from the upper, still referenced by the kernel
        if st is None:
            st = self.host_stat(i)
        a = self.make_attr()
        a.st_ino = i.ino
        if self.overrides.read_names is not None:
            p = self.presented(i, st)
            self._fill_common(a, p.mode, p.uid, p.gid)
            a.st_rdev = p.rdev
        else:       # no override xattrs: the host's owner and mode (presented() without the call)
            self._fill_common(a, st.st_mode, st.st_uid, st.st_gid)
            a.st_rdev = st.st_rdev
        if i.kind == S.S_IFDIR:
            if self.opts.static_nlink:
                a.st_nlink = 1
            elif i.lower is not None and not i.opaque:
                a.st_nlink = 2 + sum(1 for k in self.kids(i).values() if k.kind == S.S_IFDIR)
            else:
                a.st_nlink = st.st_nlink
        else:
            a.st_nlink = st.st_nlink if (i.parent is not None or i.ino == ROOT_INO) else 0
        a.st_size = st.st_size
        a.st_blocks = st.st_blocks
        a.st_blksize = st.st_blksize
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    def negative(self) -> Any:
        """A cached negative lookup: inode 0 with the entry timeout."""
        a = self.make_attr()
        a.st_ino = 0
        a.entry_timeout = self.timeout
        return a
