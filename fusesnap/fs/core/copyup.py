"""Copy-up: making an object of the lowers exist in the upper before it changes.

Everything but a regular file's data is copied synchronously; the data is a
`CopyJob` the caller may run elsewhere (the FUSE layer runs big ones in a
worker thread so its loop keeps serving). The copy keeps owner, mode, times,
xattrs and hard-link groups, and never changes the parent's times.
"""

from __future__ import annotations

import errno
import os
import stat as S
from dataclasses import dataclass

from fusesnap.fs.core.datacopy import copy_data
from fusesnap.fs.core.directories import Directories
from fusesnap.fs.core.errs import err
from fusesnap.fs.core.filefds import FileFds
from fusesnap.fs.core.inodes import Inode
from fusesnap.fs.core.attrs import ROOT_INO
from fusesnap.fs.core.longpath import short
from fusesnap.fs.core.lowertree import LowerTree
from fusesnap.fs.core.ownership import Ownership
from fusesnap.fs.core.upperdir import UpperDir, dir_times, restore_times
from fusesnap.linux.libc import link_fd


@dataclass
class CopyJob:
    inode: Inode
    src_fd: int
    dst_fd: int
    size: int
    tmp_path: bytes | None       # named temp to rename, or None for an O_TMPFILE
    dest: bytes | None           # None: the file has no name left (kept fd only)


def mark_copied(i: Inode) -> None:
    i.upper = True
    i.attr = None


class CopyUp:
    __slots__ = ("tree", "upper", "dirs", "owners", "files")

    def __init__(self, tree: LowerTree, upper: UpperDir, dirs: Directories, owners: Ownership,
                 files: FileFds) -> None:
        self.tree = tree
        self.upper = upper
        self.dirs = dirs
        self.owners = owners
        self.files = files

    def copy_up(self, i: Inode, data: bool = True) -> None:
        """Make i exist in the upper with its presented metadata (parents first)."""
        if i.upper:
            return
        job = self.begin(i, data)
        if job is not None:
            try:
                copy_data(job.src_fd, job.dst_fd, job.size)
            except BaseException:
                self.abort(job)
                raise
            self.finish(job)

    def begin(self, i: Inode, data: bool = True) -> CopyJob | None:
        """Copy up everything but a regular file's data; return the data job, if any."""
        up = self.upper
        up.writable()
        if i.parent is None:
            if i.ino == ROOT_INO:
                return None
            if i.kind != S.S_IFREG:
                raise err(errno.ENOENT)
            return self._orphan_job(i, data)
        p = i.parent
        if not p.upper:
            self.copy_up(p)
        ln = i.lower
        dest = up.child(p, i.name)
        fmt = i.kind
        if fmt != S.S_IFREG:
            ppath = up.path(p)
            times = dir_times(ppath)
            if fmt == S.S_IFDIR:
                os.mkdir(dest, 0o700)
                self.owners.apply(dest, None, fmt, ln.mode, ln.uid, ln.gid, 0, ln.xattrs, ln.mtime_ns,
                                  on_disk_ids=True)
            elif fmt == S.S_IFLNK:
                os.symlink(ln.target, dest)
                self.owners.apply(dest, None, fmt, ln.mode, ln.uid, ln.gid, 0, ln.xattrs, ln.mtime_ns,
                                  on_disk_ids=True)
            else:
                self.owners.make_node(dest, fmt, ln.mode, ln.uid, ln.gid, ln.rdev, ln.xattrs, ln.mtime_ns,
                                      on_disk_ids=True)
            restore_times(ppath, times)
            mark_copied(i)
            if fmt != S.S_IFDIR:
                self._link_group(i, dest)
            return None
        src_fd = os.open(short(ln.src), os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst_fd, tmp = up.tmpfile(p)
        except BaseException:
            os.close(src_fd)
            raise
        return CopyJob(i, src_fd, dst_fd, ln.size if data else 0, tmp, dest)

    def _orphan_job(self, i: Inode, data: bool) -> CopyJob:
        """A lower file written after its last name went (opened, unlinked, then
        written; the kernel opened it without telling us): its copy is an unnamed
        upper file only the kept fd reaches, as kernel overlayfs's open copy-up is."""
        src_fd = os.open(short(i.lower.src), os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst_fd, tmp = self.upper.tmpfile(self.dirs.table.root)
            if tmp is not None:
                os.unlink(tmp)
        except BaseException:
            os.close(src_fd)
            raise
        return CopyJob(i, src_fd, dst_fd, i.lower.size if data else 0, None, None)

    @staticmethod
    def abort(job: CopyJob) -> None:
        os.close(job.src_fd)
        os.close(job.dst_fd)
        if job.tmp_path is not None:
            try:
                os.unlink(job.tmp_path)
            except OSError:
                pass

    def finish(self, job: CopyJob) -> None:
        i = job.inode
        ln = i.lower
        if job.dest is None:
            try:
                self.owners.apply(None, job.dst_fd, S.S_IFREG, ln.mode, ln.uid, ln.gid, 0, ln.xattrs,
                                  ln.mtime_ns, on_disk_ids=True)
            except BaseException:
                self.abort(job)
                raise
            os.close(job.src_fd)
            self.files.adopt(i.ino, job.dst_fd)
            mark_copied(i)
            return
        try:
            self.owners.apply(job.dest, job.dst_fd, S.S_IFREG, ln.mode, ln.uid, ln.gid, 0, ln.xattrs,
                              ln.mtime_ns, on_disk_ids=True)
            ppath = self.upper.path(i.parent)
            times = dir_times(ppath)
            if job.tmp_path is None:
                link_fd(job.dst_fd, job.dest)
            else:
                os.rename(job.tmp_path, job.dest)
        except BaseException:
            self.abort(job)
            raise
        restore_times(ppath, times)
        os.close(job.src_fd)
        os.close(job.dst_fd)
        mark_copied(i)
        self._link_group(i, job.dest)

    def _link_group(self, i: Inode, first: bytes) -> None:
        """Every other name of a lower hard-link group gets linked: one copy, all names."""
        ln = i.lower
        paths = self.tree.link_paths(ln) if ln is not None else None
        if not paths:
            return
        up = self.upper
        for path in paths:
            j, d, name = self.dirs.resolve(path)
            if j is not i or d is None:
                continue
            if d is i.parent and name == i.name:
                continue
            if not d.upper:
                self.copy_up(d)
            dst = up.child(d, name)
            if not os.path.lexists(dst):
                ppath = up.path(d)
                times = dir_times(ppath)
                os.link(first, dst, follow_symlinks=False)
                restore_times(ppath, times)

    def copy_up_tree(self, i: Inode) -> None:
        """Copy a directory with everything visible below it into the upper; make it opaque."""
        self.copy_up(i)
        for k in list(self.dirs.kids(i).values()):
            if k.is_dir:
                self.copy_up_tree(k)
            else:
                self.copy_up(k)
        path = self.upper.path(i)
        if i.lower is not None and not i.opaque:
            self.upper.set_opaque(path)
        self.upper.drop_whiteouts(i, path)
        i.opaque = True
