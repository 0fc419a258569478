"""Owners, modes and the setuid rules of upper objects.

Where the daemon may (root, and the host object can have the presented type),
owner and mode go to the host object for real; otherwise the host object keeps
the daemon's owner and a mode no wider than the presented one, and the
presented owner, mode and type go into the override xattr. Writes, truncates
and chowns drop setuid (and group-executable setgid) as the kernel would: under
FUSE_HANDLE_KILLPRIV_V2 that is the daemon's job.
"""

from __future__ import annotations

import errno
import os
import stat as S
from typing import Any

from fusesnap.fs.core import upperformat
from fusesnap.fs.core.errs import err
from fusesnap.fs.core.ids import IdView
from fusesnap.fs.core.inodes import Inode
from fusesnap.fs.core.presenter import OverrideXattrs, Presenter, host_stat
from fusesnap.fs.core.upperdir import UpperDir


def set_times(target: int | bytes, ns: tuple[int, int]) -> None:
    """Set atime and mtime of a host object by fd or by path (never through a symlink)."""
    if isinstance(target, int):
        os.utime(target, ns=ns)
    else:
        os.utime(target, ns=ns, follow_symlinks=False)


def killed_suidgid(mode: int) -> int:
    """mode without setuid, and without setgid when group-executable (write, truncate, chown)."""
    mode &= ~S.S_ISUID
    if mode & S.S_IXGRP:
        mode &= ~S.S_ISGID
    return mode


def owner_bits(fmt: int) -> int:
    """The host mode bits a non-root daemon keeps on its own objects (rw, and x for a
    directory): it must reach what root of the view may reach, so a narrower
    presented mode goes into the override xattr instead."""
    return 0o700 if fmt == S.S_IFDIR else 0o600


def _setxattr(target: int | bytes, name: bytes, value: bytes) -> None:
    if isinstance(target, int):
        os.setxattr(target, name, value)
    else:
        os.setxattr(target, name, value, follow_symlinks=False)


class Ownership:
    __slots__ = ("ids", "upper", "presenter", "overrides", "privileged")

    def __init__(self, ids: IdView, upper: UpperDir, presenter: Presenter, overrides: OverrideXattrs,
                 privileged: bool) -> None:
        self.ids = ids
        self.upper = upper
        self.presenter = presenter
        self.overrides = overrides
        self.privileged = privileged     # root without xattr_permissions: owners go to the host

    def owner_for_new(self, d: Inode, ctx: Any) -> tuple[int, int, bool]:
        """(uid, gid, parent_setgid) of an object ctx creates in directory d.

        From d's mode and group alone: its full attributes would count a merged
        directory's subdirectories, on every file created in it."""
        if d.upper:
            p = self.presenter.presented(d)
            mode, gid = p.mode, p.gid
        else:
            mode, gid = d.lower.mode, d.lower.gid
        sgid = bool(mode & S.S_ISGID)
        return ctx.uid, (self.ids.shown_gid(gid) if sgid else ctx.gid), sgid

    def apply(self, path: bytes | None, fd: int | None, fmt: int, mode: int, uid: int, gid: int,
              rdev: int = 0, xattrs: dict[bytes, bytes] | None = None,
              mtime_ns: int | None = None, host_fmt: int | None = None,
              on_disk_ids: bool = False) -> None:
        """Give a fresh upper object its presented owner, mode, xattrs and times.

        Owner and mode go to the host when the daemon may set them, else (and for
        types the host object cannot have) into the override xattr."""
        is_link = fmt == S.S_IFLNK
        huid, hgid = (uid, gid) if on_disk_ids else self.ids.host(uid, gid)
        host_fmt = fmt if host_fmt is None else host_fmt
        need_override = host_fmt != fmt
        target: int | bytes = fd if fd is not None else path
        if self.privileged and not need_override:
            # always: the host may have inherited a setgid parent's group
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
            hst = host_stat(target)
            keep = owner_bits(fmt)
            if (huid, hgid) != (hst.st_uid, hst.st_gid) or (mode & 0o7000) or (mode & keep) != keep:
                need_override = True
        if xattrs:
            for k, v in xattrs.items():
                try:
                    _setxattr(target, k, v)
                except OSError:
                    pass
        if not is_link:
            hmode = mode & 0o7777
            if need_override:
                hmode = (mode & 0o777) | owner_bits(fmt)
                val = upperformat.format_override(huid, hgid, mode, fmt if host_fmt != fmt else None, rdev)
                _setxattr(target, self.overrides.write_name, val)
            os.chmod(target, hmode)
        if mtime_ns is not None:
            set_times(target, (mtime_ns, mtime_ns))

    def make_node(self, path: bytes, fmt: int, mode: int, uid: int, gid: int, rdev: int,
                  xattrs: dict[bytes, bytes] | None = None, mtime_ns: int | None = None,
                  on_disk_ids: bool = False) -> None:
        """A device, fifo or socket in the upper; a device the host refuses becomes a
        plain file that presents the device through the override xattr."""
        host_fmt = fmt
        try:
            os.mknod(path, fmt | 0o600, rdev)
        except OSError as e:
            if e.errno != errno.EPERM or fmt not in (S.S_IFCHR, S.S_IFBLK):
                raise
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            host_fmt = S.S_IFREG
        self.apply(path, None, fmt, mode, uid, gid, rdev, xattrs, mtime_ns, host_fmt, on_disk_ids)

    def set_owner_mode(self, i: Inode, target: int | bytes, st: os.stat_result, cur: upperformat.Presented,
                       uid: int, gid: int, mode: int, owner: bool, chmod: bool) -> None:
        """chown and/or chmod of an upper object to presented uid/gid/mode."""
        is_link = i.kind == S.S_IFLNK
        has_override = self.overrides.read_names is not None and (cur.uid, cur.gid, cur.mode, cur.rdev) != (
            st.st_uid, st.st_gid, st.st_mode, st.st_rdev)
        if self.privileged and not has_override:
            try:
                if owner:
                    huid, hgid = self.ids.host(uid, gid)
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
                raise err(errno.EPERM)
            return
        huid, hgid = self.ids.host(uid, gid)
        fmt = S.S_IFMT(cur.mode)
        host_fmt = S.S_IFMT(st.st_mode)
        keep = owner_bits(fmt)
        if (huid, hgid) == (st.st_uid, st.st_gid) and not (mode & 0o7000) and host_fmt == fmt \
                and not has_override and (mode & keep) == keep:
            os.chmod(target, mode)
            return
        val = upperformat.format_override(huid, hgid, mode, fmt if host_fmt != fmt else None, cur.rdev)
        _setxattr(target, self.overrides.write_name, val)
        os.chmod(target, (mode & 0o777) | keep)

    def chown_chmod(self, i: Inode, uid: int | None, gid: int | None, mode: int | None) -> None:
        """A SETATTR's owner and mode part (None: that one stays); presented ids."""
        target = self.upper.target(i)
        st = host_stat(target)
        cur = self.presenter.presented(i, st)
        # presented ids (what the kernel sends); cur holds on-disk ones
        cuid, cgid = self.ids.mapped(cur.uid, cur.gid)
        owner = uid is not None or gid is not None
        new_mode = (mode & 0o7777) if mode is not None else (cur.mode & 0o7777)
        if owner and mode is None and i.kind != S.S_IFDIR:
            # chown drops setuid, and setgid when group-executable, even to the same
            # owner (the kernel leaves it to us under HANDLE_KILLPRIV_V2)
            new_mode = killed_suidgid(new_mode)
        self.set_owner_mode(i, target, st, cur, cuid if uid is None else uid, cgid if gid is None else gid,
                            new_mode, owner, mode is not None)

    # ------------------------------------------------------------ setuid/setgid
    def _suidgid_to_drop(self, i: Inode) -> tuple[os.stat_result, upperformat.Presented] | None:
        """The host stat and presented view of an upper non-directory whose setuid, or
        group-executable setgid, a write, truncate or chown drops; None if it has none."""
        if i.kind in (S.S_IFDIR, S.S_IFLNK) or not i.upper:
            return None
        st = self.presenter.host_stat(i)
        cur = self.presenter.presented(i, st)
        mode = cur.mode & 0o7777
        return (st, cur) if killed_suidgid(mode) != mode else None

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
        uid, gid = self.ids.mapped(cur.uid, cur.gid)
        self.set_owner_mode(i, self.upper.target(i), st, cur, uid, gid, killed_suidgid(cur.mode & 0o7777),
                            False, True)
        i.attr = None

    def set_mtime(self, i: Inode, mtime_ns: int) -> None:
        """Put an upper file's mtime back (atime kept): the writeback cache's kernel owns it."""
        target = self.upper.target(i)
        set_times(target, (host_stat(target).st_atime_ns, mtime_ns))
        i.attr = None
