"""SETATTR: size, owner, mode and times, and what the kernel leaves to the daemon there.

The kernel opens files itself (zero-message open), so an open(O_TRUNC) reaches
the daemon as a bare size SETATTR, exactly like truncate(2); under
FUSE_HANDLE_KILLPRIV_V2 dropping setuid/setgid is the daemon's job; under the
writeback cache the kernel owns mtime. The system call the caller waits in
(fusesnap/linux/callers.py) tells these cases apart.
"""

from __future__ import annotations

import errno
import os
import stat as S
import time
from typing import Any, Protocol

from fusesnap.fs.core.copyup import CopyUp
from fusesnap.fs.core.errs import err
from fusesnap.fs.core.fileio import FileIO
from fusesnap.fs.core.inodes import Inode
from fusesnap.fs.core.ownership import Ownership, set_times
from fusesnap.fs.core.permissions import Permissions
from fusesnap.fs.core.presenter import Presenter, host_stat
from fusesnap.fs.core.upperdir import UpperDir
from fusesnap.linux import callers


class Fields(Protocol):
    """Which attributes a SETATTR sets (pyfuse3's SetattrFields has these names)."""

    update_size: bool
    update_uid: bool
    update_gid: bool
    update_mode: bool
    update_atime: bool
    update_mtime: bool


def _more_than_mctime(fields: Fields) -> bool:
    """A SETATTR of something beside mtime and ctime."""
    return (fields.update_uid or fields.update_gid or fields.update_mode or fields.update_size
            or fields.update_atime)


def flushed_times(fields: Fields) -> bool:
    """A SETATTR of mtime (and ctime) alone: how the writeback cache flushes times. (Not
    a SETATTR of nothing or of the ctime alone: those may ask to drop setuid bits.)"""
    return fields.update_mtime and not _more_than_mctime(fields)


def no_ids_or_mode(fields: Fields) -> bool:
    """A SETATTR of nothing but perhaps the ctime: what chown(f, -1, -1) leaves of itself."""
    return not (fields.update_mtime or _more_than_mctime(fields))


class Setattrs:
    __slots__ = ("upper", "copyup", "owners", "presenter", "fileio", "perms", "writeback")

    def __init__(self, upper: UpperDir, copyup: CopyUp, owners: Ownership, presenter: Presenter,
                 fileio: FileIO, perms: Permissions, writeback: bool) -> None:
        self.upper = upper
        self.copyup = copyup
        self.owners = owners
        self.presenter = presenter
        self.fileio = fileio
        self.perms = perms
        self.writeback = writeback

    def is_noop(self, i: Inode, attr: Any, fields: Fields) -> bool:
        """The writeback cache flushing a lower file's times after a change that kept its
        mtime (an unlink: the ctime, which no file keeps): nothing to copy up for that."""
        return self.writeback and not i.upper and flushed_times(fields) \
            and attr.st_mtime_ns == self.presenter.attr(i).st_mtime_ns

    @staticmethod
    def copies_data(i: Inode, attr: Any, fields: Fields) -> bool:
        """Whether applying it copies a lower file up with its data (a truncate to 0 does not)."""
        return not i.upper and not (fields.update_size and attr.st_size == 0)

    def apply(self, i: Inode, attr: Any, fields: Fields, ctx: Any = None, *, on_open_file: bool = False,
              kernel_opens_files: bool = False, killpriv_v2: bool = False) -> None:
        """Apply a SETATTR. on_open_file: it named an open file (ftruncate, futimens...);
        kernel_opens_files: a size SETATTR may be an open(O_TRUNC); killpriv_v2: setuid
        and setgid are the daemon's to drop."""
        opening = False
        if fields.update_size and attr.st_size == 0 and not on_open_file and kernel_opens_files \
                and ctx is not None:
            # open(O_TRUNC) or truncate(2)? Unknown counts as the (common) open.
            opening = callers.in_open(ctx.pid) is not False
        kept = None
        if self.writeback and fields.update_size and not fields.update_mtime and i.kind == S.S_IFREG:
            # the kernel owns mtime here and leaves it for a size it did not change: so must the host
            kept = self.presenter.attr(i).st_mtime_ns
        self._set(i, fields, attr, on_open_file, opening)
        self._drop_suidgid(i, fields, ctx, killpriv_v2)
        if kept is not None:
            self.owners.set_mtime(i, kept)
        if self.writeback and fields.update_mtime and i.kind == S.S_IFREG:
            a = self.presenter.attr(i)
            i.kernel_times = (a.st_atime_ns, a.st_mtime_ns)

    def _set(self, i: Inode, fields: Fields, attr: Any, on_open_file: bool, opening: bool) -> None:
        """on_open_file: the host's ftruncate marks the times as the caller's would;
        opening: the size change is an open(O_TRUNC)'s, which marks them even if the size stays."""
        self.upper.writable()
        touch = False
        if fields.update_size and not i.upper and i.kind == S.S_IFREG and attr.st_size == 0:
            # the view's size changes even where the fresh upper file's does not
            touch = i.lower.size != 0
            self.copyup.copy_up(i, data=False)
        else:
            self.copyup.copy_up(i)
        target = self.upper.target(i)
        if fields.update_size:
            if i.kind == S.S_IFDIR:
                raise err(errno.EISDIR)
            # truncate(2) by name leaves the times of an unchanged size, ftruncate(2) does not
            path = None if on_open_file else self.upper.name_path(i)
            if path is None:
                os.ftruncate(self.fileio.write_fd(i), attr.st_size)
            else:
                os.truncate(path, attr.st_size)
            if (touch or opening) and not fields.update_mtime:
                # a size kept by the host keeps its mtime on some filesystems (tmpfs)
                set_times(target, (host_stat(target).st_atime_ns, time.time_ns()))
        if fields.update_uid or fields.update_gid or fields.update_mode:
            self.owners.chown_chmod(i, attr.st_uid if fields.update_uid else None,
                                    attr.st_gid if fields.update_gid else None,
                                    attr.st_mode if fields.update_mode else None)
        if fields.update_atime or fields.update_mtime:
            if fields.update_atime and fields.update_mtime:
                at, mt = attr.st_atime_ns, attr.st_mtime_ns
            else:
                st = host_stat(target)
                at = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
                mt = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            set_times(target, (at, mt))
        i.attr = None

    def _drop_suidgid(self, i: Inode, fields: Fields, ctx: Any, killpriv_v2: bool) -> None:
        """Under HANDLE_KILLPRIV_V2 setuid/setgid are ours to drop after a SETATTR.

        A truncate by a caller without CAP_FSETID says so (kill_suidgid). Otherwise the
        kernel strips the mode it would have set and sends a SETATTR of nothing (the
        ctime under writeback): for chown(f, -1, -1), and before a write or fallocate by
        a caller without CAP_FSETID; a caller with CAP_FSETID sends one only when
        security.capability went, and keeps the bits."""
        owners = self.owners
        if fields.update_size:
            if getattr(fields, "kill_suidgid", False):
                owners.kill_suidgid(i)
            return
        if ctx is None or not no_ids_or_mode(fields) or not killpriv_v2 or not owners.keeps_suidgid(i):
            return
        chown = callers.in_chown(ctx.pid)
        if chown or callers.has_cap(ctx.pid, callers.CAP_FSETID) is False:
            if chown and ctx.uid != self.presenter.attr(i).st_uid and not self.perms.acts_as_root(ctx.uid) \
                    and not callers.has_cap(ctx.pid, callers.CAP_FOWNER):
                raise err(errno.EPERM)      # the mode change a non-owner may not make
            owners.kill_suidgid(i)
