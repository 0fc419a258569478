"""The union filesystem's logic in plain Python: merged lookups, copy-up, whiteouts.

fs/operations.py is thin glue over this class. Everything here raises OSError
with the errno the caller should see and never talks to the kernel, so unit
tests drive it on plain directories without a mount.
"""

from __future__ import annotations

import bisect
import errno
import os
import stat as S
import time
from dataclasses import dataclass

import pyfuse3

from fusesnap.fs.core import upperformat as uf
from fusesnap.fs.core.copyup import copy_data
from fusesnap.fs.core.filefds import FileFds
from fusesnap.fs.core.inodes import Inode
from fusesnap.fs.core.longpath import short
from fusesnap.fs.core.lowertree import LNode, LowerTree
from fusesnap.fs.options import MountOptions
from fusesnap.linux.libc import RENAME_EXCHANGE, RENAME_NOREPLACE, link_fd, renameat2

ROOT = pyfuse3.ROOT_INODE
NAME_MAX = 255

class Listing:
    """A directory's entries in a fixed order, each with a cookie that never changes.

    Entries are only appended (by ``sync``); a removed or replaced entry stays
    in place, dead, and readers skip it (``kids.get(name) is not inode``), so a
    reader resuming at any cookie neither skips nor repeats live entries. When
    dead slots outnumber live ones they are dropped; cookies are kept, so from
    then on they are looked up by bisection instead of used as indexes."""

    __slots__ = ("d", "ents", "cookies", "next", "seen")

    def __init__(self, d: Inode, kids: dict[bytes, Inode]) -> None:
        self.d = d
        self.ents: list[tuple[bytes, Inode]] = list(kids.items())
        self.cookies: list[int] | None = None    # None: cookie == index
        self.next = len(self.ents)
        self.seen = dict(kids)                   # the entries as of the last sync

    def sync(self, kids: dict[bytes, Inode]) -> None:
        # Unchanged since the last sync (every re-read of an untouched directory):
        # nothing to append and no compaction due, so skip building the pair set.
        # (Inode has no __eq__: the comparison is by identity, in C.)
        if kids == self.seen:
            return
        self.seen = dict(kids)
        have = set(self.ents)
        new = [kv for kv in kids.items() if kv not in have]
        if len(self.ents) + len(new) > 2 * len(kids) + 64:
            live = [(c, kv) for c, kv in zip(self.cookies or range(len(self.ents)), self.ents)
                    if kids.get(kv[0]) is kv[1]]
            self.cookies = [c for c, _ in live]
            self.ents = [kv for _, kv in live]
        self.ents.extend(new)
        if self.cookies is not None:
            self.cookies.extend(range(self.next, self.next + len(new)))
        self.next += len(new)

    def index(self, cookie: int) -> int:
        """Position of the first entry whose cookie is >= ``cookie``."""
        if self.cookies is None:
            return cookie
        return bisect.bisect_left(self.cookies, cookie)



def _fd_cap() -> int:
    """How many fds each cache of FileFds keeps: a quarter of the (raised) RLIMIT_NOFILE, at most 16384."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 1 << 16) if hard != resource.RLIM_INFINITY else 1 << 16
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return max(64, min(16384, soft // 4))


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@dataclass
class Ctx:
    """Who asks (a plain stand-in for pyfuse3.RequestContext in unit tests)."""

    uid: int = 0
    gid: int = 0
    umask: int = 0
    pid: int = 0


@dataclass
class CopyJob:
    inode: Inode
    src_fd: int
    dst_fd: int
    size: int
    tmp_path: bytes | None       # named temp to rename, or None for an O_TMPFILE
    dest: bytes | None           # None: the file has no name left (kept fd only)


def _stat(target: int | bytes) -> os.stat_result:
    """stat of a host object by fd or by path (never through a symlink)."""
    return os.fstat(target) if isinstance(target, int) else os.lstat(target)


def _utime(target: int | bytes, ns: tuple[int, int]) -> None:
    """Set atime and mtime of a host object by fd or by path (never through a symlink)."""
    if isinstance(target, int):
        os.utime(target, ns=ns)
    else:
        os.utime(target, ns=ns, follow_symlinks=False)


def _killed_suidgid(mode: int) -> int:
    """mode without setuid, and without setgid when group-executable (write, truncate, chown)."""
    mode &= ~S.S_ISUID
    if mode & S.S_IXGRP:
        mode &= ~S.S_ISGID
    return mode


class Union:
    """The merged view of a LowerTree and an optional writable upper directory."""

    def __init__(self, tree: LowerTree, upper: str | os.PathLike | None,
                 work: str | os.PathLike | None = None, opts: MountOptions | None = None) -> None:
        self.tree = tree
        self.opts = opts or MountOptions()
        self.timeout = float(self.opts.timeout)
        self.U = os.fsencode(os.path.abspath(upper)) if upper is not None else None
        self.W = os.fsencode(os.path.abspath(work)) if work is not None else None
        if self.U is not None and not os.path.isdir(self.U):
            raise NotADirectoryError(f"upper directory {os.fsdecode(self.U)!r} does not exist")
        self.readonly = self.U is None or self.opts.read_only
        self.euid, self.egid = os.geteuid(), os.getegid()
        self.privileged = self.euid == 0 and self.opts.xattr_permissions == 0
        dp = self.opts.default_permissions
        # mount option default_permissions: the kernel checks access against our attributes
        self.kernel_checks_permissions = dp if dp is not None else self.euid == 0
        self.override_name = uf.XATTR_PERMISSIONS_NAMES[self.opts.xattr_permissions]
        self.read_overrides = (not self.privileged) or self.opts.xattr_permissions != 0
        self.override_names = (self.override_name,) + tuple(
            n for n in uf.OVERRIDE_XATTRS if n != self.override_name)
        self.can_mknod = True
        self.inodes: dict[int, Inode] = {}
        self.next_ino = tree.max_ino + 1
        self._tree_ino = getattr(tree, 'new_ino', None)   # lazy trees hand out numbers as they grow
        self.listings: dict[int, Listing] = {}   # dir ino -> entries with stable offsets
        self.files = FileFds(_fd_cap(), self.readonly)
        self.upper_links: dict[int, Inode] = {}
        self.tmp_counter = 0
        self.uidmap, self.gidmap = self.opts.uidmap, self.opts.gidmap
        # nothing between on-disk and presented owners (the common root mount)
        self._plain_ids = not self.uidmap and not self.gidmap and self.opts.squash_uid is None \
            and self.opts.squash_gid is None
        root = Inode(ROOT, S.S_IFDIR, tree.root, self.U is not None, None, b"")
        if self.U is not None:
            root.opaque = uf.is_opaque(self.U)
        self.root = root
        self.inodes[ROOT] = root

    # ---------------------------------------------------------------- helpers
    def up(self, i: Inode) -> bytes:
        p = i.path()
        return self.U if p == b"." else short(self.U + b"/" + p)

    def child_path(self, d: Inode, name: bytes) -> bytes:
        p = d.path()
        return short(self.U + b"/" + name if p == b"." else self.U + b"/" + p + b"/" + name)

    def get(self, ino: int) -> Inode:
        i = self.inodes.get(ino)
        if i is None:
            raise _err(errno.ESTALE)
        return i

    def _new_ino(self) -> int:
        if self._tree_ino is not None:
            return self._tree_ino()
        n = self.next_ino
        self.next_ino += 1
        return n

    def _writable(self) -> None:
        if self.readonly:
            raise _err(errno.EROFS)

    @staticmethod
    def check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)

    # ---------------------------------------------------------------- directories
    def kids(self, d: Inode) -> dict[bytes, Inode]:
        k = d.kids
        if k is None:
            if not d.is_dir:
                raise _err(errno.ENOTDIR)
            k = self._load(d)
        return k

    def _lower_inode(self, ln: LNode, d: Inode, name: bytes) -> Inode:
        i = self.inodes.get(ln.ino)
        if i is None or i.lower is not ln:
            i = Inode(ln.ino, S.S_IFMT(ln.mode), ln, False, d, name)
            self.inodes[ln.ino] = i
        else:
            i.add_name(d, name)
        return i

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
        kids: dict[bytes, Inode] = {}
        low = d.lower if not d.opaque else None
        upath = None
        if d.upper:
            upath = self.up(d)
            if low is not None and d is not self.root and uf.is_opaque(upath):
                d.opaque = True
                low = None
        if low is not None:
            li = self._lower_inode
            inodes = self.inodes
            for name, ln in low.kids.items():
                if ln.ino in inodes:
                    kids[name] = li(ln, d, name)
                else:       # first sight (the common case): no lookup in _lower_inode
                    i = inodes[ln.ino] = Inode(ln.ino, ln.mode & 0o170000, ln, False, d, name)
                    kids[name] = i
        if upath is not None:
            wh: set[bytes] | None = None
            with os.scandir(upath) as it:
                for de in it:
                    name = de.name
                    if name.startswith(b".wh."):
                        if name == uf.OPQ_NAME:
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
                    if kind == S.S_IFREG and self.read_overrides:
                        ov = uf.read_override(de.path, self.override_names)
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
                            j = self.upper_links.get(st.st_ino) if st.st_nlink > 1 else None
                            if j is None:
                                if st.st_nlink > 1:
                                    self.upper_links[st.st_ino] = old
                                old.upper = True
                                old.attr = None
                                continue
                        old.drop_name(d, name)
                    if kind != S.S_IFDIR and st.st_nlink > 1:
                        i = self.upper_links.get(st.st_ino)
                        if i is not None and i.upper:
                            i.add_name(d, name)
                            kids[name] = i
                            continue
                    i = Inode(self._new_ino(), kind, None, True, d, name)
                    if kind == S.S_IFDIR:
                        i.opaque = True      # upper-only directory: nothing below it
                    elif st is not None and st.st_nlink > 1:
                        self.upper_links[st.st_ino] = i
                        i.nlink = st.st_nlink
                    self.inodes[i.ino] = i
                    kids[name] = i
            d.wh = wh
        d.kids = kids
        return kids

    def lower_has(self, d: Inode, name: bytes) -> bool:
        """Would NAME show through from the lowers if the upper had nothing there?"""
        low = d.lower
        return low is not None and not d.opaque and low.kids is not None and name in low.kids

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
                raise _err(errno.ENAMETOOLONG)
        return i

    def listing(self, d: Inode, restart: bool) -> "Listing":
        """d's entries with offsets that stay valid for the life of the mount.

        Readdir is served by inode, not by an open handle (the kernel opens
        directories itself: no OPENDIR/RELEASEDIR), so any offset ever handed
        out may come back. ``restart`` (a read from offset 0) appends entries
        added since the last restart; removed ones are skipped when read."""
        li = self.listings.get(d.ino)
        if li is None or li.d is not d:
            li = self.listings[d.ino] = Listing(d, self.kids(d))
        elif restart:
            li.sync(self.kids(d))
        return li

    # ---------------------------------------------------------------- attributes
    def attr(self, i: Inode, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        """The view's attributes; st: a host stat of the upper object taken just now."""
        if not i.upper:
            a = i.attr
            if a is None:
                a = i.attr = self._lower_attr(i)
            return a
        return self._upper_attr(i, st)

    def _shown_gid(self, gid: int) -> int:
        """The group the view shows for an on-disk (or layer) group."""
        o = self.opts
        return o.squash_gid if o.squash_gid is not None else (self.gidmap.to_presented(gid) if self.gidmap else gid)

    def _fill_common(self, a: pyfuse3.EntryAttributes, mode: int, uid: int, gid: int) -> None:
        a.st_mode = mode
        if self._plain_ids:
            a.st_uid = uid
            a.st_gid = gid
        else:
            o = self.opts
            a.st_uid = o.squash_uid if o.squash_uid is not None else (self.uidmap.to_presented(uid) if self.uidmap else uid)
            a.st_gid = self._shown_gid(gid)
        a.entry_timeout = self.timeout
        a.attr_timeout = self.timeout

    def _lower_attr(self, i: Inode) -> pyfuse3.EntryAttributes:
        ln = i.lower
        a = pyfuse3.EntryAttributes()
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

    def host_stat(self, i: Inode) -> os.stat_result:
        return _stat(self._xtarget(i))

    def presented(self, i: Inode, st: os.stat_result | None = None) -> uf.Presented:
        """Mode/owner/rdev the view shows for an upper object (override xattr applied)."""
        if st is None:
            st = self.host_stat(i)
        ov = None
        if self.read_overrides and not S.S_ISLNK(st.st_mode):
            try:
                ov = uf.read_override(self._xtarget(i), self.override_names)
            except OSError:
                ov = None
        return uf.presented_stat(st, ov)

    def _upper_attr(self, i: Inode, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        if i.parent is None and i.ino != ROOT and i.attr is not None:
            return i.attr          # gone from the upper, still referenced by the kernel
        if st is None:
            st = self.host_stat(i)
        a = pyfuse3.EntryAttributes()
        a.st_ino = i.ino
        if self.read_overrides:
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
            a.st_nlink = st.st_nlink if (i.parent is not None or i.ino == ROOT) else 0
        a.st_size = st.st_size
        a.st_blocks = st.st_blocks
        a.st_blksize = st.st_blksize
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    # ---------------------------------------------------------------- metadata writes
    def _host_ids(self, uid: int, gid: int) -> tuple[int, int]:
        return (self.uidmap.to_host(uid) if self.uidmap else uid,
                self.gidmap.to_host(gid) if self.gidmap else gid)

    def _apply_meta(self, path: bytes, fd: int | None, fmt: int, mode: int, uid: int, gid: int,
                    rdev: int = 0, xattrs: dict[bytes, bytes] | None = None,
                    mtime_ns: int | None = None, host_fmt: int | None = None,
                    on_disk_ids: bool = False) -> None:
        """Give a fresh upper object its presented owner, mode, xattrs and times.

        Owner and mode go to the host when the daemon may set them, else (and for
        types the host object cannot have) into the override xattr."""
        is_link = fmt == S.S_IFLNK
        huid, hgid = (uid, gid) if on_disk_ids else self._host_ids(uid, gid)
        host_fmt = fmt if host_fmt is None else host_fmt
        need_override = host_fmt != fmt
        if self.privileged and not need_override:
            if True:    # always: the host may have inherited a setgid parent's group
                try:
                    if fd is not None:
                        os.fchown(fd, huid, hgid)
                    else:
                        os.chown(path, huid, hgid, follow_symlinks=False)
                except OSError as e:
                    if e.errno not in (errno.EPERM, errno.EINVAL) or is_link:
                        raise
                    need_override = True
        elif not is_link:
            hst = os.fstat(fd) if fd is not None else os.lstat(path)
            if (huid, hgid) != (hst.st_uid, hst.st_gid) or (mode & 0o7000):
                need_override = True
        if xattrs:
            for k, v in xattrs.items():
                try:
                    if fd is not None:
                        os.setxattr(fd, k, v)
                    else:
                        os.setxattr(path, k, v, follow_symlinks=False)
                except OSError:
                    pass
        if not is_link:
            hmode = mode & 0o7777
            if need_override:
                hmode = (mode & 0o777) | (0o700 if fmt == S.S_IFDIR else 0o600)
                val = uf.format_override(huid, hgid, mode, fmt if host_fmt != fmt else None, rdev)
                if fd is not None:
                    os.setxattr(fd, self.override_name, val)
                else:
                    os.setxattr(path, self.override_name, val, follow_symlinks=False)
            if fd is not None:
                os.fchmod(fd, hmode)
            else:
                os.chmod(path, hmode)
        if mtime_ns is not None:
            _utime(fd if fd is not None else path, (mtime_ns, mtime_ns))

    def _set_opaque(self, path: bytes) -> None:
        names = (b"trusted.overlay.opaque",) if self.euid == 0 else ()
        names += (b"user.fuseoverlayfs.opaque",)
        for n in names:
            try:
                os.setxattr(path, n, b"y", follow_symlinks=False)
                return
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    raise
        fd = os.open(path + b"/" + uf.OPQ_NAME, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)

    def _drop_whiteouts(self, i: Inode, path: bytes) -> None:
        """An opaque dir needs no whiteouts, and kernel overlayfs lists them in one."""
        if not i.wh:
            return
        times = self._dir_times(path)      # dropping hidden markers changes nothing visible
        for name in i.wh:
            for p in (path + b"/" + name, path + b"/.wh." + name):
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                if not S.S_ISDIR(st.st_mode):
                    os.unlink(p)
        i.wh = None
        self._restore_times(path, times)

    def _whiteout(self, d: Inode, name: bytes) -> None:
        """Hide NAME of the lowers below directory d (d must be in the upper)."""
        path = self.child_path(d, name)
        if self.can_mknod:
            try:
                os.mknod(path, S.S_IFCHR | 0o600, 0)
                self._note_wh(d, name)
                return
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EACCES, errno.ENOTSUP):
                    raise
                self.can_mknod = False
        fd = os.open(self.child_path(d, b".wh." + name), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self._note_wh(d, name)

    @staticmethod
    def _note_wh(d: Inode, name: bytes) -> None:
        if d.wh is None:
            d.wh = set()
        d.wh.add(name)

    def _clear_whiteout(self, d: Inode, name: bytes) -> bool:
        """Remove an upper whiteout for NAME in d; True if there was one."""
        if not d.wh or name not in d.wh:
            return False
        d.wh.discard(name)
        for p in (self.child_path(d, name), self.child_path(d, b".wh." + name)):
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if S.S_ISDIR(st.st_mode):
                continue
            os.unlink(p)
        return True

    # ---------------------------------------------------------------- copy-up
    @staticmethod
    def _dir_times(path: bytes) -> tuple[int, int]:
        st = os.lstat(path)
        return st.st_atime_ns, st.st_mtime_ns

    @staticmethod
    def _restore_times(path: bytes, t: tuple[int, int]) -> None:
        """Copy-up is no change of the parent: keep its times (as kernel overlayfs does)."""
        os.utime(path, ns=t, follow_symlinks=False)

    def copy_up(self, i: Inode, data: bool = True) -> None:
        """Make i exist in the upper with its presented metadata (parents first)."""
        if i.upper:
            return
        job = self.begin_copy_up(i, data)
        if job is not None:
            try:
                copy_data(job.src_fd, job.dst_fd, job.size)
            except BaseException:
                self.abort_copy_up(job)
                raise
            self.finish_copy_up(job)

    def begin_copy_up(self, i: Inode, data: bool = True) -> CopyJob | None:
        """Copy up everything but a regular file's data; return the data job, if any."""
        self._writable()
        if i.parent is None:
            if i.ino == ROOT:
                return None
            if i.kind != S.S_IFREG:
                raise _err(errno.ENOENT)
            return self._orphan_copy_job(i, data)
        p = i.parent
        if not p.upper:
            self.copy_up(p)
        ln = i.lower
        dest = self.child_path(p, i.name)
        fmt = i.kind
        if fmt != S.S_IFREG:
            ppath = self.up(p)
            times = self._dir_times(ppath)
            if fmt == S.S_IFDIR:
                os.mkdir(dest, 0o700)
                self._apply_meta(dest, None, fmt, ln.mode, ln.uid, ln.gid, 0, ln.xattrs, ln.mtime_ns,
                                 on_disk_ids=True)
            elif fmt == S.S_IFLNK:
                os.symlink(ln.target, dest)
                self._apply_meta(dest, None, fmt, ln.mode, ln.uid, ln.gid, 0, ln.xattrs, ln.mtime_ns,
                                 on_disk_ids=True)
            else:
                self._make_node(dest, fmt, ln.mode, ln.uid, ln.gid, ln.rdev, ln.xattrs, ln.mtime_ns,
                                on_disk_ids=True)
            self._restore_times(ppath, times)
            self._mark_copied(i)
            if fmt != S.S_IFDIR:
                self._link_group(i, dest)
            return None
        src_fd = os.open(short(ln.src), os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst_fd, tmp = self._tmpfile(p)
        except BaseException:
            os.close(src_fd)
            raise
        return CopyJob(i, src_fd, dst_fd, ln.size if data else 0, tmp, dest)

    def _orphan_copy_job(self, i: Inode, data: bool) -> CopyJob:
        """A lower file written after its last name went (opened, unlinked, then
        written; the kernel opened it without telling us): its copy is an unnamed
        upper file only the kept fd reaches, as kernel overlayfs's open copy-up is."""
        src_fd = os.open(short(i.lower.src), os.O_RDONLY | os.O_CLOEXEC)
        try:
            dst_fd, tmp = self._tmpfile(self.root)
            if tmp is not None:
                os.unlink(tmp)
        except BaseException:
            os.close(src_fd)
            raise
        return CopyJob(i, src_fd, dst_fd, i.lower.size if data else 0, None, None)

    def abort_copy_up(self, job: CopyJob) -> None:
        os.close(job.src_fd)
        os.close(job.dst_fd)
        if job.tmp_path is not None:
            try:
                os.unlink(job.tmp_path)
            except OSError:
                pass

    def finish_copy_up(self, job: CopyJob) -> None:
        i = job.inode
        ln = i.lower
        if job.dest is None:
            try:
                self._apply_meta(None, job.dst_fd, S.S_IFREG, ln.mode, ln.uid, ln.gid, 0, ln.xattrs,
                                 ln.mtime_ns, on_disk_ids=True)
            except BaseException:
                self.abort_copy_up(job)
                raise
            os.close(job.src_fd)
            self.files.adopt(i.ino, job.dst_fd)
            self._mark_copied(i)
            return
        try:
            self._apply_meta(job.dest, job.dst_fd, S.S_IFREG, ln.mode, ln.uid, ln.gid, 0, ln.xattrs,
                             ln.mtime_ns, on_disk_ids=True)
            ppath = self.up(i.parent)
            times = self._dir_times(ppath)
            if job.tmp_path is None:
                link_fd(job.dst_fd, job.dest)
            else:
                os.rename(job.tmp_path, job.dest)
        except BaseException:
            self.abort_copy_up(job)
            raise
        self._restore_times(ppath, times)
        os.close(job.src_fd)
        os.close(job.dst_fd)
        self._mark_copied(i)
        self._link_group(i, job.dest)

    def _link_group(self, i: Inode, first: bytes) -> None:
        """Every other name of a lower hard-link group gets linked: one copy, all names."""
        ln = i.lower
        paths = self.tree.link_paths(ln) if ln is not None else None
        if paths:
            for path in paths:
                j, d, name = self._resolve(path)
                if j is not i or d is None:
                    continue
                if (d is i.parent and name == i.name):
                    continue
                if not d.upper:
                    self.copy_up(d)
                dst = self.child_path(d, name)
                if not os.path.lexists(dst):
                    ppath = self.up(d)
                    times = self._dir_times(ppath)
                    os.link(first, dst, follow_symlinks=False)
                    self._restore_times(ppath, times)

    def _mark_copied(self, i: Inode) -> None:
        i.upper = True
        i.attr = None

    def _resolve(self, path: bytes) -> tuple[Inode | None, Inode | None, bytes]:
        d = self.root
        parts = path.split(b"/")
        for part in parts[:-1]:
            n = self.kids(d).get(part)
            if n is None or not n.is_dir:
                return None, None, b""
            d = n
        return self.kids(d).get(parts[-1]), d, parts[-1]

    def _tmpfile(self, d: Inode) -> tuple[int, bytes | None]:
        dirpath = self.up(d)
        try:
            fd = os.open(dirpath, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            return fd, None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
        base = self.W if self.W is not None else dirpath
        while True:
            self.tmp_counter += 1
            tmp = base + b"/.wh.fusesnap-tmp-%d-%d" % (os.getpid(), self.tmp_counter)
            try:
                return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
            except FileExistsError:
                continue

    def _make_node(self, path: bytes, fmt: int, mode: int, uid: int, gid: int, rdev: int,
                   xattrs: dict[bytes, bytes] | None = None, mtime_ns: int | None = None,
                   on_disk_ids: bool = False) -> None:
        host_fmt = fmt
        try:
            os.mknod(path, fmt | 0o600, rdev)
        except OSError as e:
            if e.errno != errno.EPERM or fmt not in (S.S_IFCHR, S.S_IFBLK):
                raise
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            host_fmt = S.S_IFREG
        self._apply_meta(path, None, fmt, mode, uid, gid, rdev, xattrs, mtime_ns, host_fmt, on_disk_ids)

    def copy_up_tree(self, i: Inode) -> None:
        """Copy a directory with everything visible below it into the upper; make it opaque."""
        self.copy_up(i)
        for k in list(self.kids(i).values()):
            if k.is_dir:
                self.copy_up_tree(k)
            else:
                self.copy_up(k)
        if i.lower is not None and not i.opaque:
            self._set_opaque(self.up(i))
        self._drop_whiteouts(i, self.up(i))
        i.opaque = True

    # ---------------------------------------------------------------- creating
    def _owner_for_new(self, d: Inode, ctx) -> tuple[int, int, bool]:
        """(uid, gid, parent_setgid) of an object ctx creates in directory d.

        From d's mode and group alone: its full attributes would count a merged
        directory's subdirectories, on every file created in it."""
        if d.upper:
            p = self.presented(d)
            mode, gid = p.mode, p.gid
        else:
            mode, gid = d.lower.mode, d.lower.gid
        sgid = bool(mode & S.S_ISGID)
        return ctx.uid, (self._shown_gid(gid) if sgid else ctx.gid), sgid

    def _prepare_new(self, d: Inode, name: bytes) -> tuple[bytes, bool]:
        self._writable()
        self.check_name(name)
        k = self.kids(d)
        if name in k:
            raise _err(errno.EEXIST)
        self.copy_up(d)
        had_wh = self._clear_whiteout(d, name)
        return self.child_path(d, name), had_wh

    def _add(self, d: Inode, name: bytes, kind: int) -> Inode:
        i = Inode(self._new_ino(), kind, None, True, d, name)
        if kind == S.S_IFDIR:
            i.kids = {}
            i.opaque = True
        self.inodes[i.ino] = i
        d.kids[name] = i
        return i

    def create(self, d: Inode, name: bytes, mode: int, flags: int, ctx
               ) -> tuple[int, Inode, os.stat_result | None]:
        """Create and open a regular file; also returns its host stat when that is
        final (the reply's attributes need no second one)."""
        path, _ = self._prepare_new(d, name)
        uid, gid, _sgid = self._owner_for_new(d, ctx)
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
            if (st.st_uid, st.st_gid) != self._host_ids(uid, gid) or S.S_IMODE(st.st_mode) != mode:
                # another owner (or a setgid parent's group), a masked or special mode
                self._apply_meta(path, fd, S.S_IFREG, mode, uid, gid)
                st = None
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        i = self._add(d, name, S.S_IFREG)
        self.files.put_upper(i.ino, fd, oflags & os.O_ACCMODE == os.O_RDWR)
        return fd, i, st

    def mkdir(self, d: Inode, name: bytes, mode: int, ctx) -> Inode:
        path, had_wh = self._prepare_new(d, name)
        uid, gid, sgid = self._owner_for_new(d, ctx)
        if sgid:
            mode |= S.S_ISGID
        os.mkdir(path, 0o700)
        try:
            self._apply_meta(path, None, S.S_IFDIR, mode & 0o7777, uid, gid)
            if had_wh or self.lower_has(d, name):
                self._set_opaque(path)
        except BaseException:
            self._rm_upper_dir(path)
            raise
        return self._add(d, name, S.S_IFDIR)

    def symlink(self, d: Inode, name: bytes, target: bytes, ctx) -> Inode:
        path, _ = self._prepare_new(d, name)
        uid, gid, _ = self._owner_for_new(d, ctx)
        os.symlink(target, path)
        self._apply_meta(path, None, S.S_IFLNK, 0o777, uid, gid)
        return self._add(d, name, S.S_IFLNK)

    def mknod(self, d: Inode, name: bytes, mode: int, rdev: int, ctx) -> Inode:
        fmt = S.S_IFMT(mode)
        if fmt == S.S_IFREG:
            return self.create(d, name, mode, os.O_WRONLY, ctx)[1]
        if fmt not in (S.S_IFCHR, S.S_IFBLK, S.S_IFIFO, S.S_IFSOCK):
            raise _err(errno.EINVAL)
        if fmt == S.S_IFCHR and rdev == 0:
            raise _err(errno.EPERM)      # that would be a whiteout
        path, _ = self._prepare_new(d, name)
        uid, gid, _ = self._owner_for_new(d, ctx)
        self._make_node(path, fmt, mode & 0o7777, uid, gid, rdev)
        return self._add(d, name, fmt)

    def link(self, i: Inode, d: Inode, name: bytes) -> Inode:
        if i.is_dir:
            raise _err(errno.EPERM)
        self._writable()
        self.check_name(name)
        if name in self.kids(d):
            raise _err(errno.EEXIST)
        self.copy_up(i)
        path, _ = self._prepare_new(d, name)
        os.link(self.up(i), path, follow_symlinks=False)
        d.kids[name] = i
        i.add_name(d, name)
        i.nlink += 1
        i.attr = None
        return i

    # ---------------------------------------------------------------- removing
    def _rm_upper_dir(self, path: bytes) -> None:
        """Remove an upper directory that holds only whiteouts/markers."""
        with os.scandir(path) as it:
            for de in it:
                if de.is_dir(follow_symlinks=False):
                    self._rm_upper_dir(short(de.path))
                else:
                    os.unlink(de.path)
        os.rmdir(path)

    def _last_attr(self, i: Inode):
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
                self.files.pin(i.ino, self.up(i))
            return None
        if i.kind != S.S_IFDIR and i.nlink > 1:
            return None
        try:
            return self._upper_attr(i)
        except OSError:
            return None

    def _drop(self, d: Inode, name: bytes, i: Inode, last=None) -> None:
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
        self._writable()
        i = self.kids(d).get(name)
        if i is None:
            raise _err(errno.ENOENT)
        if i.is_dir:
            raise _err(errno.EISDIR)
        need_wh = self.lower_has(d, name)
        last = self._last_attr(i)
        if i.upper:
            os.unlink(self.child_path(d, name))
        if need_wh:
            self.copy_up(d)
            self._whiteout(d, name)
        self._drop(d, name, i, last)
        return i

    def rmdir(self, d: Inode, name: bytes) -> Inode:
        self._writable()
        i = self.kids(d).get(name)
        if i is None:
            raise _err(errno.ENOENT)
        if not i.is_dir:
            raise _err(errno.ENOTDIR)
        if self.kids(i):
            raise _err(errno.ENOTEMPTY)
        need_wh = self.lower_has(d, name)
        last = self._last_attr(i)
        if i.upper:
            self._rm_upper_dir(self.child_path(d, name))
            short.invalidate()
        if need_wh:
            self.copy_up(d)
            self._whiteout(d, name)
        self._drop(d, name, i, last)
        return i

    # ---------------------------------------------------------------- rename
    def rename(self, od: Inode, old: bytes, nd: Inode, new: bytes, flags: int = 0) -> tuple[Inode, Inode | None]:
        self._writable()
        self.check_name(new)
        src = self.kids(od).get(old)
        if src is None:
            raise _err(errno.ENOENT)
        dst = self.kids(nd).get(new)
        if flags & RENAME_NOREPLACE and dst is not None:
            raise _err(errno.EEXIST)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise _err(errno.ENOENT)
            return self._exchange(od, old, src, nd, new, dst)
        if dst is src:
            return src, None
        if src.is_dir:
            a = nd
            while a is not None:       # no moving a directory below itself
                if a is src:
                    raise _err(errno.EINVAL)
                a = a.parent
        if dst is not None:
            if src.is_dir and not dst.is_dir:
                raise _err(errno.ENOTDIR)
            if dst.is_dir and not src.is_dir:
                raise _err(errno.EISDIR)
            if dst.is_dir and self.kids(dst):
                raise _err(errno.ENOTEMPTY)
        if src.is_dir and src.lower is not None and not src.opaque:
            self.copy_up_tree(src)
        else:
            self.copy_up(src)
        self.copy_up(nd)
        newpath = self.child_path(nd, new)
        if dst is not None and dst.upper and dst.is_dir:
            # the host rename needs an empty target: drop its hidden whiteouts
            with os.scandir(newpath) as it:
                for de in it:
                    if de.is_dir(follow_symlinks=False):
                        self._rm_upper_dir(short(de.path))
                    else:
                        os.unlink(de.path)
        if dst is None or not dst.upper:
            self._clear_whiteout(nd, new)
        need_opaque = src.is_dir and self.lower_has(nd, new)   # host marker needed even if upper-only
        need_wh = self.lower_has(od, old)
        dst_last = self._last_attr(dst) if dst is not None else None
        oldpath = self.child_path(od, old)
        os.rename(oldpath, newpath)
        if src.is_dir:
            short.invalidate()
        if need_opaque:
            self._set_opaque(newpath)
            self._drop_whiteouts(src, newpath)
            src.opaque = True
        if src.is_dir and self.lower_has(nd, new):
            src.opaque = True
        if need_wh:
            self._whiteout(od, old)
        del od.kids[old]
        src.drop_name(od, old)
        if dst is not None:
            self._drop(nd, new, dst, dst_last)
        nd.kids[new] = src
        src.add_name(nd, new)
        src.attr = None
        return src, dst

    def _exchange(self, od: Inode, old: bytes, a: Inode, nd: Inode, new: bytes, b: Inode) -> tuple[Inode, Inode]:
        for x in (a, b):
            if x.is_dir and x.lower is not None and not x.opaque:
                self.copy_up_tree(x)
            else:
                self.copy_up(x)
        renameat2(self.child_path(od, old), self.child_path(nd, new), RENAME_EXCHANGE)
        short.invalidate()
        for x, d, name in ((a, nd, new), (b, od, old)):
            if x.is_dir and self.lower_has(d, name):
                self._set_opaque(self.child_path(d, name))
                self._drop_whiteouts(x, self.child_path(d, name))
                x.opaque = True
        od.kids[old], nd.kids[new] = b, a
        a.drop_name(od, old)
        b.drop_name(nd, new)
        a.add_name(nd, new)
        b.add_name(od, old)
        return a, b

    # ---------------------------------------------------------------- setattr / xattrs
    def setattr(self, i: Inode, fields, attr, on_open_file: bool = False,
                opening: bool = False) -> None:
        """Apply a SETATTR. on_open_file: the request named an open file (ftruncate),
        so the host's ftruncate marks the times as the caller's would; opening: the
        size change is an open(O_TRUNC)'s, which marks them even if the size stays."""
        self._writable()
        touch = False
        if fields.update_size and not i.upper and i.kind == S.S_IFREG and attr.st_size == 0:
            # the view's size changes even where the fresh upper file's does not
            touch = i.lower.size != 0
            self.copy_up(i, data=False)
        else:
            self.copy_up(i)
        target = self._xtarget(i)
        if fields.update_size:
            if i.kind == S.S_IFDIR:
                raise _err(errno.EISDIR)
            # truncate(2) by name leaves the times of an unchanged size, ftruncate(2) does not
            path = None if on_open_file else self._name_path(i)
            if path is None:
                os.ftruncate(self.write_fd(i), attr.st_size)
            else:
                os.truncate(path, attr.st_size)
            if (touch or opening) and not fields.update_mtime:
                # a size kept by the host keeps its mtime on some filesystems (tmpfs)
                _utime(target, (_stat(target).st_atime_ns, time.time_ns()))
        if fields.update_uid or fields.update_gid or fields.update_mode:
            st = _stat(target)
            cur = self.presented(i, st)
            # presented ids (what the kernel sends); cur holds on-disk ones
            uid = attr.st_uid if fields.update_uid else (
                self.uidmap.to_presented(cur.uid) if self.uidmap else cur.uid)
            gid = attr.st_gid if fields.update_gid else (
                self.gidmap.to_presented(cur.gid) if self.gidmap else cur.gid)
            mode = (attr.st_mode & 0o7777) if fields.update_mode else (cur.mode & 0o7777)
            if (fields.update_uid or fields.update_gid) and not fields.update_mode and i.kind != S.S_IFDIR:
                # chown drops setuid, and setgid when group-executable, even to the same
                # owner (the kernel leaves it to us under HANDLE_KILLPRIV_V2)
                mode = _killed_suidgid(mode)
            self._set_owner_mode(i, target, st, cur, uid, gid, mode,
                                 fields.update_uid or fields.update_gid, fields.update_mode)
        if fields.update_atime or fields.update_mtime:
            if fields.update_atime and fields.update_mtime:
                at, mt = attr.st_atime_ns, attr.st_mtime_ns
            else:
                st = _stat(target)
                at = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                mt = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            _utime(target, (at, mt))
        i.attr = None

    def _suidgid_to_drop(self, i: Inode) -> tuple[os.stat_result, uf.Presented] | None:
        """The host stat and presented view of an upper non-directory whose setuid, or
        group-executable setgid, a write, truncate or chown drops; None if it has none."""
        if i.kind in (S.S_IFDIR, S.S_IFLNK) or not i.upper:
            return None
        st = self.host_stat(i)
        cur = self.presented(i, st)
        mode = cur.mode & 0o7777
        return (st, cur) if _killed_suidgid(mode) != mode else None

    def keeps_suidgid(self, i: Inode) -> bool:
        """Whether an upper non-directory has bits a write, truncate or chown drops."""
        return self._suidgid_to_drop(i) is not None

    def kill_suidgid(self, i: Inode) -> None:
        """Drop setuid, and setgid when group-executable, as a write or truncate by a
        caller without CAP_FSETID does (the kernel asks, or an open(O_TRUNC) by non-root)."""
        found = self._suidgid_to_drop(i)
        if found is None:
            return
        st, cur = found
        uid = self.uidmap.to_presented(cur.uid) if self.uidmap else cur.uid
        gid = self.gidmap.to_presented(cur.gid) if self.gidmap else cur.gid
        self._set_owner_mode(i, self._xtarget(i), st, cur, uid, gid, _killed_suidgid(cur.mode & 0o7777),
                             False, True)
        i.attr = None

    def set_mtime(self, i: Inode, mtime_ns: int) -> None:
        """Put an upper file's mtime back (atime kept): the writeback cache's kernel owns it."""
        target = self._xtarget(i)
        _utime(target, (_stat(target).st_atime_ns, mtime_ns))
        i.attr = None

    def _set_owner_mode(self, i: Inode, target, st: os.stat_result, cur: uf.Presented, uid: int,
                        gid: int, mode: int, owner: bool, chmod: bool) -> None:
        is_link = i.kind == S.S_IFLNK
        has_override = self.read_overrides and (cur.uid, cur.gid, cur.mode, cur.rdev) != (
            st.st_uid, st.st_gid, st.st_mode, st.st_rdev)
        if self.privileged and not has_override:
            try:
                if owner:
                    huid, hgid = self._host_ids(uid, gid)
                    if isinstance(target, int):
                        os.fchown(target, huid, hgid)
                    else:
                        os.chown(target, huid, hgid, follow_symlinks=False)
                # (a chown alone leaves a mode without setuid/setgid as it is)
                if not is_link and (chmod or (owner and (mode != S.S_IMODE(st.st_mode) or mode & 0o6000))):
                    os.chmod(target, mode)          # by fd or by path (never a symlink here)
                return
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EINVAL) or is_link:
                    raise
        if is_link:
            if owner:
                raise _err(errno.EPERM)
            return
        huid, hgid = self._host_ids(uid, gid)
        fmt = S.S_IFMT(cur.mode)
        host_fmt = S.S_IFMT(st.st_mode)
        if (huid, hgid) == (st.st_uid, st.st_gid) and not (mode & 0o7000) and host_fmt == fmt \
                and not has_override:
            os.chmod(target, mode)
            return
        val = uf.format_override(huid, hgid, mode, fmt if host_fmt != fmt else None, cur.rdev)
        if isinstance(target, int):
            os.setxattr(target, self.override_name, val)
        else:
            os.setxattr(target, self.override_name, val, follow_symlinks=False)
        os.chmod(target, (mode & 0o777) | (0o700 if fmt == S.S_IFDIR else 0o600))

    def _xtarget(self, i: Inode):
        """An upper object's host inode for metadata calls: the file's kept fd when there
        is one (no path to build and walk: a file being written is stat'ed, chowned and
        timestamped through it), else its path; ENOENT for a nameless one without."""
        if i.kind == S.S_IFREG:
            fd = self.files.kept(i.ino)
            if fd is not None:
                return fd
        if i.parent is None and i.ino != ROOT:
            raise _err(errno.ENOENT)
        return self.up(i)

    def getxattr(self, i: Inode, name: bytes) -> bytes:
        if uf.is_hidden_xattr(name):
            raise _err(errno.ENODATA)
        if not i.upper:
            x = i.lower.xattrs
            v = x.get(name) if x else None
            if v is None:
                raise _err(errno.ENODATA)
            return v
        t = self._xtarget(i)
        if isinstance(t, int):
            return os.getxattr(t, name)
        return os.getxattr(t, name, follow_symlinks=False)

    def listxattr(self, i: Inode) -> list[bytes]:
        if not i.upper:
            x = i.lower.xattrs
            return list(x.keys()) if x else []
        t = self._xtarget(i)
        names = os.listxattr(t) if isinstance(t, int) else os.listxattr(t, follow_symlinks=False)
        return [n for n in (os.fsencode(n) for n in names) if not uf.is_hidden_xattr(n)]

    def setxattr(self, i: Inode, name: bytes, value: bytes) -> None:
        self._writable()
        if uf.is_hidden_xattr(name):
            raise _err(errno.EPERM)
        self.copy_up(i)
        t = self._xtarget(i)
        if isinstance(t, int):
            os.setxattr(t, name, value)
        else:
            os.setxattr(t, name, value, follow_symlinks=False)
        i.attr = None

    def removexattr(self, i: Inode, name: bytes) -> None:
        self._writable()
        if uf.is_hidden_xattr(name):
            raise _err(errno.ENODATA)
        if not i.upper:
            x = i.lower.xattrs
            if not x or name not in x:
                raise _err(errno.ENODATA)
        self.copy_up(i)
        t = self._xtarget(i)
        if isinstance(t, int):
            os.removexattr(t, name)
        else:
            os.removexattr(t, name, follow_symlinks=False)

    # ---------------------------------------------------------------- files
    def read_fd(self, i: Inode) -> int:
        if i.upper:
            return self._upper_fd(i, False)
        # lower files never change: one read-only fd per lower object
        return self.files.lower_fd(i.lower.ino, i.lower.src)

    def write_fd(self, i: Inode) -> int:
        """The upper file's writable fd; the caller has copied i up."""
        return self._upper_fd(i, True)

    def _upper_fd(self, i: Inode, write: bool) -> int:
        # every READ/WRITE comes here: build the path only when no kept fd serves
        fd = self.files.cached(i.ino, write)
        return fd if fd is not None else self.files.upper_fd(i.ino, self._name_path(i), write)

    def _name_path(self, i: Inode) -> bytes | None:
        return self.up(i) if (i.parent is not None or i.ino == ROOT) else None

    def open(self, i: Inode, flags: int, caller_uid: int = 0) -> int:
        """An open(2) the kernel passed on (mounts without zero-message opens).

        Checks what the host would check on its own open (kept fds do not),
        copies up for write access and applies O_TRUNC (atomic_o_trunc).
        Returns the fd that serves the file from now on."""
        acc = flags & os.O_ACCMODE
        write = acc != os.O_RDONLY
        if write or flags & os.O_TRUNC:
            self._writable()
            if not i.upper:
                self.copy_up(i, data=not (flags & os.O_TRUNC))
        if not i.upper:
            return self.read_fd(i)
        path = self._name_path(i)
        if path is not None:
            want = {os.O_RDONLY: os.R_OK, os.O_WRONLY: os.W_OK}.get(acc, os.R_OK | os.W_OK)
            if not os.access(path, want, follow_symlinks=False):
                raise _err(errno.EACCES)
        fd = self.write_fd(i) if write or flags & os.O_TRUNC else self.read_fd(i)
        if flags & os.O_TRUNC and i.kind == S.S_IFREG:
            os.ftruncate(fd, 0)
            i.attr = None
            if caller_uid != 0:
                # open(O_TRUNC) reaches us instead of a size setattr (atomic_o_trunc):
                # kill the privileges the kernel would have killed for that caller
                self.kill_suidgid(i)
        return fd

    def readlink(self, i: Inode) -> bytes:
        if i.kind != S.S_IFLNK:
            raise _err(errno.EINVAL)
        if not i.upper:
            return i.lower.target
        return os.readlink(self.up(i))

    def forget(self, ino: int, n: int) -> None:
        i = self.inodes.get(ino)
        if i is None or ino == ROOT:
            return
        i.lookups -= n
        if i.lookups <= 0 and i.parent is None:
            del self.inodes[ino]
            self.listings.pop(ino, None)
            self.files.drop(ino)

    def statfs(self) -> os.statvfs_result:
        if self.U is not None:
            return os.statvfs(self.U)
        return os.statvfs(self.opts.lowerdirs[0] if self.opts.lowerdirs else "/")
