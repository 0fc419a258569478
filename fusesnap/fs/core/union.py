"""The union filesystem's rules in plain Python: one object per mount, the core's front door.

`Union` wires the collaborators below together and is all the FUSE layer
(fs/fuse/operations.py) talks to; it knows nothing of pyfuse3 or trio, raises
OSError with the errno the caller should see, and never talks to the kernel,
so tests drive it on plain directories without a mount:

- directories.py  the merged namespace (lower tree + upper dir, whiteouts, opaque dirs)
- presenter.py    attributes as the view shows them; ids.py the id mapping
- ownership.py    owners, modes and setuid rules of upper objects
- permissions.py  the access rule where the daemon answers ACCESS itself
- copyup.py       copying lower objects up (datacopy.py moves the bytes)
- namespace.py    create, link, unlink, rename and friends
- setattrs.py     SETATTR; xattrs.py extended attributes; fileio.py fds, open, write
- upperdir.py     the upper directory on the host and the markers it writes
- recording.py    the access log of a recorded mount (record=FILE)
"""

from __future__ import annotations

import os
import stat as S
from typing import Any, Callable, Iterable

from fusesnap.fs.core.attrs import ROOT_INO, Attr, AttrFactory
from fusesnap.fs.core.copyup import CopyJob, CopyUp
from fusesnap.fs.core.directories import Directories
from fusesnap.fs.core.filefds import FileFds, fd_cap
from fusesnap.fs.core.fileio import FileIO
from fusesnap.fs.core.ids import IdView
from fusesnap.fs.core.inodes import Inode, InodeTable
from fusesnap.fs.core.listing import Listing
from fusesnap.fs.core.lowertree import LowerTree
from fusesnap.fs.core import upperformat
from fusesnap.fs.core.namespace import Namespace
from fusesnap.fs.core.ownership import Ownership
from fusesnap.fs.core.permissions import Permissions
from fusesnap.fs.core.presenter import OverrideXattrs, Presenter
from fusesnap.fs.core.recording import AccessLog
from fusesnap.fs.core.setattrs import Fields, Setattrs
from fusesnap.fs.core.upperdir import UpperDir
from fusesnap.fs.core.xattrs import Xattrs
from fusesnap.fs.options import MountOptions


class Ctx:
    """Who asks: uid, gid, umask and pid of the calling process (pyfuse3's
    RequestContext has the same fields)."""

    __slots__ = ("uid", "gid", "umask", "pid")

    def __init__(self, uid: int = 0, gid: int = 0, umask: int = 0, pid: int = 0) -> None:
        self.uid, self.gid, self.umask, self.pid = uid, gid, umask, pid


class Union:
    """The merged view of a LowerTree and an optional writable upper directory."""

    def __init__(self, tree: LowerTree, upper: str | os.PathLike | None,
                 work: str | os.PathLike | None = None, opts: MountOptions | None = None,
                 make_attr: AttrFactory = Attr) -> None:
        self.tree = tree
        self.opts = opts = opts or MountOptions()
        self.timeout = float(opts.timeout)
        upper_b = os.fsencode(os.path.abspath(upper)) if upper is not None else None
        work_b = os.fsencode(os.path.abspath(work)) if work is not None else None
        if upper_b is not None and not os.path.isdir(upper_b):
            raise NotADirectoryError(f"upper directory {os.fsdecode(upper_b)!r} does not exist")
        self.readonly = upper_b is None or opts.read_only
        euid = os.geteuid()
        privileged = euid == 0 and opts.xattr_permissions == 0
        self.perms = Permissions(euid, bool(opts.allow_other), bool(opts.default_permissions))
        # mount option default_permissions: the kernel checks access against our attributes
        self.kernel_checks_permissions = self.perms.kernel_checks
        self.files = FileFds(fd_cap(), self.readonly)
        self.upper = UpperDir(upper_b, work_b, self.files, self.readonly)
        root = Inode(ROOT_INO, S.S_IFDIR, tree.root, upper_b is not None, None, b"")
        if upper_b is not None:
            root.opaque = upperformat.is_opaque(upper_b)
        self.root = root
        self.table = InodeTable(tree, root)
        self.inodes = self.table.by_ino
        overrides = OverrideXattrs(opts, privileged)
        self.dirs = Directories(self.table, self.upper, overrides.read_names)
        self.ids = IdView(opts)
        self.presenter = Presenter(opts, self.ids, make_attr, self.upper, overrides, self.dirs.kids)
        self.owners = Ownership(self.ids, self.upper, self.presenter, overrides, privileged)
        self.copyup = CopyUp(tree, self.upper, self.dirs, self.owners, self.files)
        self.names = Namespace(self.table, self.dirs, self.upper, self.copyup, self.owners,
                               self.presenter, self.files)
        self.fileio = FileIO(self.upper, self.files, self.copyup, self.owners)
        self.setattrs = Setattrs(self.upper, self.copyup, self.owners, self.presenter, self.fileio,
                                 self.perms, opts.writeback)
        self.xattrs = Xattrs(self.upper, self.copyup)
        self.access_log = AccessLog.create(opts.record, opts.layers_for_record()) if opts.record else None
        # the hot paths, bound once
        self.get = self.table.get
        self.kids = self.dirs.kids
        self.lookup = self.dirs.lookup
        self.attr = self.presenter.attr
        self.read_fd = self.fileio.read_fd
        self.write_fd = self.fileio.write_fd

    def use_attr_record(self, make_attr: AttrFactory) -> None:
        """Fill attribute records of this class from now on (the FUSE layer's reply type)."""
        self.presenter.make_attr = make_attr
        for i in self.inodes.values():
            i.attr = None

    # ------------------------------------------------------------ reading the view
    def require_writable(self) -> None:
        """EROFS unless the view may change."""
        self.upper.writable()

    def listing(self, d: Inode, restart: bool) -> Listing:
        return self.dirs.listing(d, restart)

    def negative_attr(self) -> Any:
        return self.presenter.negative()

    def readlink(self, i: Inode) -> bytes:
        return self.fileio.readlink(i)

    def may_access(self, i: Inode, mask: int, ctx: Any, groups: Callable[[], Iterable[int]]) -> bool:
        """access(2) by the one rule of fs/core/permissions.py (mounts whose kernel does not check)."""
        a = self.attr(i)
        return self.perms.may(a.st_mode, a.st_uid, a.st_gid, mask, ctx.uid, ctx.gid, groups)

    def forget(self, ino: int, n: int) -> None:
        if self.table.forget(ino, n):
            self.dirs.forget(ino)
            self.files.drop(ino)

    def statfs(self) -> os.statvfs_result:
        if self.upper.root is not None:
            return os.statvfs(self.upper.root)
        return os.statvfs(self.opts.lowerdirs[0] if self.opts.lowerdirs else "/")

    # ------------------------------------------------------------ copy-up
    def copy_up(self, i: Inode, data: bool = True) -> None:
        self.copyup.copy_up(i, data)

    def begin_copy_up(self, i: Inode, data: bool = True) -> CopyJob | None:
        """Everything but a regular file's data; the data job (run it, then finish_copy_up)."""
        return self.copyup.begin(i, data)

    def finish_copy_up(self, job: CopyJob) -> None:
        self.copyup.finish(job)

    def abort_copy_up(self, job: CopyJob) -> None:
        self.copyup.abort(job)

    # ------------------------------------------------------------ names
    def create(self, d: Inode, name: bytes, mode: int, flags: int, ctx: Any
               ) -> tuple[int, Inode, os.stat_result | None]:
        return self.names.create(d, name, mode, flags, ctx)

    def mkdir(self, d: Inode, name: bytes, mode: int, ctx: Any) -> Inode:
        return self.names.mkdir(d, name, mode, ctx)

    def symlink(self, d: Inode, name: bytes, target: bytes, ctx: Any) -> Inode:
        return self.names.symlink(d, name, target, ctx)

    def mknod(self, d: Inode, name: bytes, mode: int, rdev: int, ctx: Any) -> Inode:
        return self.names.mknod(d, name, mode, rdev, ctx)

    def link(self, i: Inode, d: Inode, name: bytes) -> Inode:
        return self.names.link(i, d, name)

    def unlink(self, d: Inode, name: bytes) -> Inode:
        return self.names.unlink(d, name)

    def rmdir(self, d: Inode, name: bytes) -> Inode:
        return self.names.rmdir(d, name)

    def rename(self, od: Inode, old: bytes, nd: Inode, new: bytes, flags: int = 0
               ) -> tuple[Inode, Inode | None]:
        return self.names.rename(od, old, nd, new, flags)

    # ------------------------------------------------------------ attributes
    def setattr(self, i: Inode, attr: Any, fields: Fields, ctx: Any = None, *, on_open_file: bool = False,
                kernel_opens_files: bool = False, killpriv_v2: bool = False) -> None:
        self.setattrs.apply(i, attr, fields, ctx, on_open_file=on_open_file,
                            kernel_opens_files=kernel_opens_files, killpriv_v2=killpriv_v2)

    def setattr_is_noop(self, i: Inode, attr: Any, fields: Fields) -> bool:
        return self.setattrs.is_noop(i, attr, fields)

    def setattr_copies_data(self, i: Inode, attr: Any, fields: Fields) -> bool:
        return self.setattrs.copies_data(i, attr, fields)

    def kill_suidgid(self, i: Inode) -> None:
        self.owners.kill_suidgid(i)

    def getxattr(self, i: Inode, name: bytes) -> bytes:
        return self.xattrs.get(i, name)

    def listxattr(self, i: Inode) -> list[bytes]:
        return self.xattrs.list(i)

    def setxattr(self, i: Inode, name: bytes, value: bytes) -> None:
        self.xattrs.set(i, name, value)

    def removexattr(self, i: Inode, name: bytes) -> None:
        self.xattrs.remove(i, name)

    # ------------------------------------------------------------ contents
    def open(self, i: Inode, flags: int, caller_uid: int = 0) -> int:
        return self.fileio.open(i, flags, caller_uid)

    def write(self, i: Inode, off: int, buf: bytes, kill_suidgid: bool = False) -> int:
        return self.fileio.write(i, off, buf, kill_suidgid)

    def fsync(self, i: Inode, datasync: bool) -> None:
        self.fileio.fsync(i, datasync)

    def fsync_dir(self, i: Inode) -> None:
        self.fileio.fsync_dir(i)
