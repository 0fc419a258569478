"""Changes to names: create, mkdir, symlink, mknod, link, unlink, rmdir, rename.

A name that shows through from the lowers is never removed from them: it is
whited out in the upper. A directory that replaces a lower one, or is renamed
over one, is made opaque. A lower directory that is renamed is copied up whole
under its new name and made opaque (kernel overlayfs would need redirect_dir),
so every upper stays a plain OCI-style diff.
"""

from __future__ import annotations

import errno
import os
import stat as S
from typing import Any

from fusesnap.fs.core.copyup import CopyUp
from fusesnap.fs.core.directories import Directories, check_name
from fusesnap.fs.core.errs import err
from fusesnap.fs.core.filefds import FileFds
from fusesnap.fs.core.inodes import Inode, InodeTable
from fusesnap.fs.core.longpath import short
from fusesnap.fs.core.ownership import Ownership
from fusesnap.fs.core.presenter import Presenter
from fusesnap.fs.core.upperdir import UpperDir
from fusesnap.linux.libc import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2


class Namespace:
    __slots__ = ("table", "dirs", "upper", "copyup", "owners", "presenter", "files")

    def __init__(self, table: InodeTable, dirs: Directories, upper: UpperDir, copyup: CopyUp,
                 owners: Ownership, presenter: Presenter, files: FileFds) -> None:
        self.table = table
        self.dirs = dirs
        self.upper = upper
        self.copyup = copyup
        self.owners = owners
        self.presenter = presenter
        self.files = files

    # ------------------------------------------------------------ creating
    def _prepare_new(self, d: Inode, name: bytes) -> tuple[bytes, bool]:
        self.upper.writable()
        check_name(name)
        if name in self.dirs.kids(d):
            raise err(errno.EEXIST)
        self.copyup.copy_up(d)
        had_wh = self.upper.clear_whiteout(d, name)
        return self.upper.child(d, name), had_wh

    def _add(self, d: Inode, name: bytes, kind: int) -> Inode:
        i = self.table.new_upper(d, name, kind)
        if kind == S.S_IFDIR:
            i.kids = {}
            i.opaque = True
        d.kids[name] = i
        return i

    def create(self, d: Inode, name: bytes, mode: int, flags: int, ctx: Any
               ) -> tuple[int, Inode, os.stat_result | None]:
        """Create and open a regular file; also returns its host stat when that is
        final (the reply's attributes need no second one)."""
        path, _ = self._prepare_new(d, name)
        uid, gid, _sgid = self.owners.owner_for_new(d, ctx)
        oflags = (flags & ~(os.O_NOCTTY | os.O_DIRECT | os.O_NOATIME)) | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        if oflags & os.O_ACCMODE == os.O_WRONLY:
            oflags = (oflags & ~os.O_ACCMODE) | os.O_RDWR
        mode &= 0o7777
        # Permission bits at once (the daemon's umask is 0), setuid/setgid only after
        # the owner is set (a chown would drop them).
        fd = os.open(path, oflags, mode & 0o777)
        st: os.stat_result | None = None
        try:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != self.owners.ids.host(uid, gid) or S.S_IMODE(st.st_mode) != mode:
                # another owner (or a setgid parent's group), a masked or special mode
                self.owners.apply(path, fd, S.S_IFREG, mode, uid, gid)
                st = None
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        i = self._add(d, name, S.S_IFREG)
        self.files.put_upper(i.ino, fd, oflags & os.O_ACCMODE == os.O_RDWR)
        return fd, i, st

    def mkdir(self, d: Inode, name: bytes, mode: int, ctx: Any) -> Inode:
        path, had_wh = self._prepare_new(d, name)
        uid, gid, sgid = self.owners.owner_for_new(d, ctx)
        if sgid:
            mode |= S.S_ISGID
        os.mkdir(path, 0o700)
        try:
            self.owners.apply(path, None, S.S_IFDIR, mode & 0o7777, uid, gid)
            if had_wh or self.dirs.lower_has(d, name):
                self.upper.set_opaque(path)
        except BaseException:
            self.upper.rm_tree(path)
            raise
        return self._add(d, name, S.S_IFDIR)

    def symlink(self, d: Inode, name: bytes, target: bytes, ctx: Any) -> Inode:
        path, _ = self._prepare_new(d, name)
        uid, gid, _ = self.owners.owner_for_new(d, ctx)
        os.symlink(target, path)
        self.owners.apply(path, None, S.S_IFLNK, 0o777, uid, gid)
        return self._add(d, name, S.S_IFLNK)

    def mknod(self, d: Inode, name: bytes, mode: int, rdev: int, ctx: Any) -> Inode:
        fmt = S.S_IFMT(mode)
        if fmt == S.S_IFREG:
            return self.create(d, name, mode, os.O_WRONLY, ctx)[1]
        if fmt not in (S.S_IFCHR, S.S_IFBLK, S.S_IFIFO, S.S_IFSOCK):
            raise err(errno.EINVAL)
        if fmt == S.S_IFCHR and rdev == 0:
            raise err(errno.EPERM)      # that would be a whiteout
        path, _ = self._prepare_new(d, name)
        uid, gid, _ = self.owners.owner_for_new(d, ctx)
        self.owners.make_node(path, fmt, mode & 0o7777, uid, gid, rdev)
        return self._add(d, name, fmt)

    def link(self, i: Inode, d: Inode, name: bytes) -> Inode:
        if i.is_dir:
            raise err(errno.EPERM)
        self.upper.writable()
        check_name(name)
        if name in self.dirs.kids(d):
            raise err(errno.EEXIST)
        self.copyup.copy_up(i)
        path, _ = self._prepare_new(d, name)
        os.link(self.upper.path(i), path, follow_symlinks=False)
        d.kids[name] = i
        i.add_name(d, name)
        i.nlink += 1
        i.attr = None
        return i

    # ------------------------------------------------------------ removing
    def _last_attr(self, i: Inode) -> Any:
        """Attributes to keep answering with once the last name of an upper object is gone.

        Fifos, devices, sockets and directories are opened by the kernel itself (or
        not at all), so no daemon fd keeps them alive; a regular file the kernel
        still knows gets its fd pinned, and attributes come from that fd."""
        if not i.upper:
            return None
        if i.kind == S.S_IFREG:
            # by known names, not nlink: a lower link group's other names may be
            # whited out or not loaded yet
            if i.lookups > 0 and len(i.names()) <= 1:
                self.files.pin(i.ino, self.upper.path(i))
            return None
        if i.kind != S.S_IFDIR and i.nlink > 1:
            return None
        try:
            return self.presenter.upper_attr(i)
        except OSError:
            return None

    @staticmethod
    def _drop(d: Inode, name: bytes, i: Inode, last: Any = None) -> None:
        del d.kids[name]
        i.drop_name(d, name)
        if i.kind == S.S_IFDIR:
            i.nlink = 0
        else:
            i.nlink -= 1
        i.attr = None
        if last is not None and i.parent is None:
            last.st_nlink = 0
            i.attr = last

    def unlink(self, d: Inode, name: bytes) -> Inode:
        self.upper.writable()
        i = self.dirs.kids(d).get(name)
        if i is None:
            raise err(errno.ENOENT)
        if i.is_dir:
            raise err(errno.EISDIR)
        need_wh = self.dirs.lower_has(d, name)
        last = self._last_attr(i)
        if i.upper:
            os.unlink(self.upper.child(d, name))
        if need_wh:
            self.copyup.copy_up(d)
            self.upper.whiteout(d, name)
        self._drop(d, name, i, last)
        return i

    def rmdir(self, d: Inode, name: bytes) -> Inode:
        self.upper.writable()
        i = self.dirs.kids(d).get(name)
        if i is None:
            raise err(errno.ENOENT)
        if not i.is_dir:
            raise err(errno.ENOTDIR)
        if self.dirs.kids(i):
            raise err(errno.ENOTEMPTY)
        need_wh = self.dirs.lower_has(d, name)
        last = self._last_attr(i)
        if i.upper:
            self.upper.rm_tree(self.upper.child(d, name))
            short.invalidate()
        if need_wh:
            self.copyup.copy_up(d)
            self.upper.whiteout(d, name)
        self._drop(d, name, i, last)
        return i

    # ------------------------------------------------------------ rename
    def rename(self, od: Inode, old: bytes, nd: Inode, new: bytes, flags: int = 0
               ) -> tuple[Inode, Inode | None]:
        up, dirs = self.upper, self.dirs
        up.writable()
        check_name(new)
        src = dirs.kids(od).get(old)
        if src is None:
            raise err(errno.ENOENT)
        dst = dirs.kids(nd).get(new)
        if flags & RENAME_NOREPLACE and dst is not None:
            raise err(errno.EEXIST)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise err(errno.ENOENT)
            return self._exchange(od, old, src, nd, new, dst)
        if dst is src:
            return src, None
        if src.is_dir:
            a = nd
            while a is not None:       # no moving a directory below itself
                if a is src:
                    raise err(errno.EINVAL)
                a = a.parent
        if dst is not None:
            if src.is_dir and not dst.is_dir:
                raise err(errno.ENOTDIR)
            if dst.is_dir and not src.is_dir:
                raise err(errno.EISDIR)
            if dst.is_dir and dirs.kids(dst):
                raise err(errno.ENOTEMPTY)
        if src.is_dir and src.lower is not None and not src.opaque:
            self.copyup.copy_up_tree(src)
        else:
            self.copyup.copy_up(src)
        self.copyup.copy_up(nd)
        newpath = up.child(nd, new)
        if dst is not None and dst.upper and dst.is_dir:
            up.empty_dir(newpath)      # the host rename needs an empty target
        if dst is None or not dst.upper:
            up.clear_whiteout(nd, new)
        need_opaque = src.is_dir and dirs.lower_has(nd, new)   # host marker needed even if upper-only
        need_wh = dirs.lower_has(od, old)
        dst_last = self._last_attr(dst) if dst is not None else None
        oldpath = up.child(od, old)
        os.rename(oldpath, newpath)
        if src.is_dir:
            short.invalidate()
        if need_opaque:
            up.set_opaque(newpath)
            up.drop_whiteouts(src, newpath)
            src.opaque = True
        if src.is_dir and dirs.lower_has(nd, new):
            src.opaque = True
        if need_wh:
            up.whiteout(od, old)
        del od.kids[old]
        src.drop_name(od, old)
        if dst is not None:
            self._drop(nd, new, dst, dst_last)
        nd.kids[new] = src
        src.add_name(nd, new)
        src.attr = None
        return src, dst

    def _exchange(self, od: Inode, old: bytes, a: Inode, nd: Inode, new: bytes, b: Inode
                  ) -> tuple[Inode, Inode]:
        up = self.upper
        for x in (a, b):
            if x.is_dir and x.lower is not None and not x.opaque:
                self.copyup.copy_up_tree(x)
            else:
                self.copyup.copy_up(x)
        renameat2(up.child(od, old), up.child(nd, new), RENAME_EXCHANGE)
        short.invalidate()
        for x, d, name in ((a, nd, new), (b, od, old)):
            if x.is_dir and self.dirs.lower_has(d, name):
                path = up.child(d, name)
                up.set_opaque(path)
                up.drop_whiteouts(x, path)
                x.opaque = True
        od.kids[old], nd.kids[new] = b, a
        a.drop_name(od, old)
        b.drop_name(nd, new)
        a.add_name(nd, new)
        b.add_name(od, old)
        return a, b
