"""The FUSE layer: decode a pyfuse3 request, call the union core, encode the answer.

The filesystem's rules live in fs/core (plain Python); this module only maps
requests onto `Union`, OSError onto FUSEError, and adds what the kernel
protocol needs: caching hints, zero-message opens, spliced reads, and big
copy-ups moved to a worker thread so the loop keeps serving. Every handler is a
few lines; synchronous work stays synchronous (no thread hop per request).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat as S
from typing import Any, Awaitable, Callable, TypeVar

import pyfuse3
import trio

from fusesnap.errors import FusesnapError
from fusesnap.fs.core.datacopy import copy_data
from fusesnap.fs.core.inodes import Inode
from fusesnap.fs.core.union import Union
from fusesnap.fs.fuse import splicing
from fusesnap.linux import spaceops
from fusesnap.linux.kernel import in_initial_user_namespace, release_at_least

FUSEError = pyfuse3.FUSEError
log = logging.getLogger("fusesnap.fs")

# What each of fusesnap's pyfuse3 patches (third_party/pyfuse3) adds, by what it exposes.
PATCHES: dict[str, Callable[[Any], bool]] = {
    "0001 fallocate and lseek handlers": lambda m: hasattr(m.Operations, "lseek"),
    "0002 opendir returning cache_readdir": lambda m: hasattr(m, "OPENDIR_FILEINFO"),
    "0003 symlink caching": lambda m: hasattr(m.Operations, "enable_symlink_cache"),
    "0004 readdir without opendir": lambda m: hasattr(m, "NO_OPENDIR"),
    "0005 files without open": lambda m: hasattr(m, "NO_OPEN"),
    "0006 plain READDIR": lambda m: hasattr(m, "READDIRPLUS_AUTO"),
    "0007 literal __version__": lambda m: "+fusesnap" in getattr(m, "__version__", ""),
    "0008 HANDLE_KILLPRIV_V2": lambda m: hasattr(m, "killpriv_v2_active"),
    "0009 read from an fd": lambda m: hasattr(m, "READ_FD"),
    "0010 request waiter hook": lambda m: hasattr(m, "set_request_waiter"),
    "0011 READDIRPLUS entries without attributes": lambda m: hasattr(m, "READDIRPLUS_NAMES"),
}

# A READDIRPLUS reply gives attributes (and a lookup reference) to a directory's first
# ATTRS_IN_LISTING entries and only names past them, until an entry of that directory
# is looked up. A walker that stats what it lists then needs no LOOKUP in directories of
# ordinary size, and one that stats as it lists (`ls -l`) one LOOKUP per chunk of a huge
# one, while a cold listing of a huge directory by name does not make the kernel
# instantiate a dentry and an inode per entry (a 100k-name `ls` took 3.1x plain with
# attributes throughout; docs/BENCHMARKS.md, "Attributes with every listing").
ATTRS_IN_LISTING = 4096


def missing_patches(module: Any) -> list[str]:
    """The fusesnap patches a pyfuse3 module lacks (none for the build scripts/setup makes)."""
    return [name for name, present in PATCHES.items() if not present(module)]


def require_patched(module: Any) -> None:
    """fusesnap needs its pyfuse3 build: with a stock one it would lose kernel caching,
    spliced reads, fallocate and SEEK_DATA silently, so it refuses, in one line."""
    missing = missing_patches(module)
    if missing:
        raise FusesnapError(f"pyfuse3 {getattr(module, '__version__', '?')} lacks fusesnap's patches "
                            f"({', '.join(m.split()[0] for m in missing)}): install it with scripts/setup "
                            "(third_party/pyfuse3)")


require_patched(pyfuse3)
T = TypeVar("T")
BIG = 1 << 20            # copy-ups above this size run in a worker thread


def _sup_groups(pid: int) -> set[int]:
    try:
        return pyfuse3.get_sup_groups(pid)
    except Exception:
        return set()


def _bug() -> FUSEError:
    """An unexpected exception must not kill the daemon: log it, answer EIO."""
    log.exception("internal error while serving a request")
    return FUSEError(errno.EIO)


def _fuse_errors(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """One error mapping for every request: FUSEError as raised, OSError as its errno, a bug as EIO."""

    @functools.wraps(handler)
    async def serve(*args: Any) -> T:
        try:
            return await handler(*args)
        except FUSEError:
            raise
        except OSError as e:
            raise FUSEError(e.errno) from None
        except Exception:
            raise _bug() from None

    return serve


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_symlink_cache = True     # honoured by a pyfuse3 that knows FUSE_CAP_CACHE_SYMLINKS
    # Zero-message opendir (pyfuse3 patch 0004); pyfuse3 resets it when the kernel lacks it.
    readdir_without_opendir = True
    # Plain READDIR where entries are only listed (pyfuse3 patch 0006); per mount (readdirplus=).
    readdirplus_auto = False

    def __init__(self, union: Union) -> None:
        super().__init__()
        union.use_attr_record(pyfuse3.EntryAttributes)
        self.union = union
        # Zero-message open (pyfuse3 patch 0005; reset by pyfuse3 when the kernel
        # lacks it): no OPEN/RELEASE round trip per open(2). Only where the kernel
        # checks permissions itself: a daemon that checks them does so at OPEN.
        self.files_without_open = union.kernel_checks_permissions
        self.noxattrs = union.opts.noxattrs
        # readdirplus=auto (pyfuse3 patch 0006): the kernel asks for plain READDIR after
        # a directory's first chunk until a listed entry is looked up, and then looks up
        # every entry a walk stats: a LOOKUP round trip each, as most walkers read all
        # names before they stat any (find, tar, Go's filepath.Walk in podman's diff).
        # Always READDIRPLUS (the default) gives every entry its attributes; a cold
        # listing of 100k names then costs the kernel a dentry and inode each
        # (docs/BENCHMARKS.md, "Attributes with every listing").
        self.readdirplus_auto = union.opts.readdirplus_auto
        # Directories listed past ATTRS_IN_LISTING with names only, and those of them
        # whose entries were looked up since: their listings carry attributes throughout,
        # as the kernel's own auto mode switches to READDIRPLUS after a lookup (`ls -l`).
        self._names_only: set[int] = set()
        self._stated: set[int] = set()
        self.fsync_enabled = union.opts.fsync
        # writeback=1: the kernel merges small writes into big WRITEs (untar, builds), and
        # then owns mtime, size and dirty pages the host file does not have yet. Off by
        # default: a full disk then fails close() after every write() succeeded, and the
        # kernel forgets st_blocks on every close(), so the next stat of an unchanged
        # file costs a GETATTR (docs/BENCHMARKS.md, "Untar, request by request").
        self.writeback = union.opts.writeback
        self.enable_writeback_cache = self.writeback
        # FUSE_HANDLE_KILLPRIV_V2 (pyfuse3 patch 0008): the kernel sets SB_NOSEC, so a
        # write no longer asks for security.capability every time; dropping setuid/setgid
        # on write, truncate and chown is ours (fs/core/setattrs.py). The kernel flags a
        # WRITE for a writer without CAP_FSETID in the initial user namespace; root of a
        # user namespace (a daemon started by rootless podman, and its containers) would
        # then lose setuid bits that kernel overlayfs lets it keep, so there the kernel
        # keeps deciding.
        self.handle_killpriv_v2 = in_initial_user_namespace()
        # New files a caller only writes (tar, cp, dpkg, compilers) are created with
        # CREATE and opened FOPEN_DIRECT_IO: every write(2) is then one WRITE, where the
        # page cache splits one that starts inside a page it has not cached in two, for
        # one RELEASE per file. Readers of the file stay coherent only where the kernel
        # invalidates their pages before such a write (Linux 6.6, "fuse: invalidate page
        # cache pages before direct write"); setuid bits only where the kernel flags the
        # write for us.
        self.direct_create = self.files_without_open and not self.writeback \
            and self.handle_killpriv_v2 and release_at_least(6, 6)
        # The largest READ answered with the host fd, which libfuse splices (fs/fuse/splicing.py).
        limit = splicing.max_spliced_read()
        self.splice_max = (1 << 62) if limit is None else limit
        self.access_log = union.access_log
        if self.access_log is not None:
            # A recorded mount (record=FILE) gets recording handlers; every other mount keeps
            # the plain ones, so recording costs nothing where it is off. The kernel opens
            # files without asking (no OPEN), so a file counts as touched at the first request
            # for its content: READ (read, execute and mmap all fault pages in through it),
            # WRITE, CREATE/MKNOD; an empty file, which no READ ever reaches, at LOOKUP
            # (one listed with its attributes needs none: unrecorded, and nothing to warm).
            # Later accesses hit the kernel's caches and send nothing, recorded or not.
            self.read = self._read_recorded
            self.write = self._write_recorded
            self.lookup = self._lookup_recorded
            self.create = self._create_recorded
            self.mknod = self._mknod_recorded

    # ------------------------------------------------------------------ helpers
    def _entry(self, i: Inode, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that hands the kernel a reference (st: see Union.attr)."""
        a = self.union.attr(i, st)
        i.lookups += 1
        return a

    def _inode(self, ino: int) -> Inode:
        i = self.union.inodes.get(ino)
        if i is None:
            raise FUSEError(errno.ESTALE)
        return i

    async def _copy_up(self, i: Inode, data: bool = True) -> None:
        """Copy-up; big files copy their data in a worker thread so the loop keeps serving."""
        while i.busy is not None:
            await i.busy.wait()
        if i.upper:
            return
        u = self.union
        if not data or i.kind != S.S_IFREG or i.lower is None or i.lower.size < BIG:
            u.copy_up(i, data)
            return
        # parents first (cheap), then this file's data off the loop
        if i.parent is not None and not i.parent.upper:
            u.copy_up(i.parent)
        ev = i.busy = trio.Event()
        try:
            job = u.begin_copy_up(i, data)
            if job is not None:
                try:
                    await trio.to_thread.run_sync(copy_data, job.src_fd, job.dst_fd, job.size)
                except BaseException:
                    u.abort_copy_up(job)
                    raise
                u.finish_copy_up(job)
        finally:
            i.busy = None
            ev.set()

    async def _copy_up_files(self, d: Inode) -> None:
        """Copy up every file below a lower directory that is about to move."""
        for k in list(self.union.kids(d).values()):
            if k.is_dir:
                if k.lower is not None and not k.opaque:
                    await self._copy_up_files(k)
            elif not k.upper:
                await self._copy_up(k)

    async def _for_write(self, fh: int) -> Inode:
        """The inode behind a write access: copied up first (the open did not)."""
        i = self._inode(fh)
        if not i.upper:
            self.union.require_writable()
            await self._copy_up(i)
        return i

    # ------------------------------------------------------------------ lookups
    @_fuse_errors
    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode in self._names_only:
            self._stated.add(parent_inode)      # its listing's entries get stat'ed: attributes from now on
        i = self.union.lookup(self._inode(parent_inode), name)
        if i is None:
            return self.union.negative_attr()
        return self._entry(i)

    async def forget(self, inode_list):
        f = self.union.forget
        for ino, n in inode_list:
            f(ino, n)

    @_fuse_errors
    async def getattr(self, inode, ctx=None):
        return self.union.attr(self._inode(inode))

    @_fuse_errors
    async def readlink(self, inode, ctx):
        return self.union.readlink(self._inode(inode))

    # ------------------------------------------------------------------ directories
    @_fuse_errors
    async def opendir(self, inode, ctx):
        if self.readdir_without_opendir:
            # The kernel opens directories itself from now on (keep_cache +
            # cache_readdir, no RELEASEDIR): a warm walk sends no requests.
            raise FUSEError(errno.ENOSYS)
        i = self._inode(inode)
        if not i.is_dir:
            raise FUSEError(errno.ENOTDIR)
        # The handle is the inode: readdir works by inode either way.
        fi = pyfuse3.FileInfo(fh=inode, keep_cache=True)
        fi.cache_readdir = True
        return fi

    @_fuse_errors
    async def readdir(self, fh, start_id, token):
        u = self.union
        d = self._inode(fh)
        li = u.listing(d, start_id == 0)
        reply = pyfuse3.readdir_reply
        if start_id == 0:
            if not reply(token, b".", u.attr(d), 1):
                return
            start_id = 1
        if start_id == 1:
            p = d.parent if d.parent is not None else d
            if not reply(token, b"..", u.attr(p), 2):
                return
            start_id = 2
        kids = u.kids(d)
        ents, cookies = li.ents, li.cookies
        attr, get = u.attr, kids.get
        start = li.index(start_id - 2)
        end = len(ents)
        if token.plus:
            with_attrs = end if d.ino in self._stated else min(end, max(start, ATTRS_IN_LISTING))
            if with_attrs < end:
                self._names_only.add(d.ino)
            for idx in range(start, with_attrs):
                name, i = ents[idx]
                if get(name) is not i:
                    continue
                off = (idx if cookies is None else cookies[idx]) + 3
                # u.attr's cached lower attributes, without the call
                a = i.attr if not i.upper else None
                if not reply(token, name, a if a is not None else attr(i), off):
                    return
                i.lookups += 1
            start = with_attrs
            if start >= end:
                return
        # Inode number and type only (plain READDIR, or READDIRPLUS past
        # ATTRS_IN_LISTING entries: patch 0011), no lookup reference.
        a = pyfuse3.EntryAttributes()
        for idx in range(start, end):
            name, i = ents[idx]
            if get(name) is not i:
                continue
            a.st_ino = i.ino
            a.st_mode = i.kind
            if not reply(token, name, a, (idx if cookies is None else cookies[idx]) + 3, False):
                return

    async def releasedir(self, fh):
        pass

    @_fuse_errors
    async def fsyncdir(self, fh, datasync):
        h = self.union.inodes.get(fh)
        if h is not None and self.fsync_enabled:
            self.union.fsync_dir(h)

    @_fuse_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._entry(self.union.mkdir(self._inode(parent_inode), name, mode, ctx))

    @_fuse_errors
    async def rmdir(self, parent_inode, name, ctx):
        self.union.rmdir(self._inode(parent_inode), name)

    @_fuse_errors
    async def unlink(self, parent_inode, name, ctx):
        self.union.unlink(self._inode(parent_inode), name)

    @_fuse_errors
    async def symlink(self, parent_inode, name, target, ctx):
        return self._entry(self.union.symlink(self._inode(parent_inode), name, target, ctx))

    @_fuse_errors
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._entry(self.union.mknod(self._inode(parent_inode), name, mode, rdev, ctx))

    @_fuse_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        i = self._inode(inode)
        await self._copy_up(i)
        return self._entry(self.union.link(i, self._inode(new_parent_inode), new_name))

    @_fuse_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        od = self._inode(parent_inode_old)
        nd = self._inode(parent_inode_new)
        src = self.union.lookup(od, name_old)
        dst = self.union.lookup(nd, name_new) if flags & 2 else None     # RENAME_EXCHANGE
        for x in (src, dst):
            if x is None:
                continue
            if x.is_dir:
                if x.lower is not None and not x.opaque:
                    await self._copy_up_files(x)   # big files off the loop first
            else:
                await self._copy_up(x)
        self.union.rename(od, name_old, nd, name_new, flags)

    # ------------------------------------------------------------------ files
    # Every file handle is the inode number: the kernel opens files itself
    # (files_without_open) and sends the inode, or open/create return it.
    @_fuse_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        if self.files_without_open and not (self.direct_create and pyfuse3.killpriv_v2_active()):
            # the kernel creates files with MKNOD and opens them itself (no_create):
            # one request per new file instead of CREATE + RELEASE
            raise FUSEError(errno.ENOSYS)
        _fd, i, st = self.union.create(self._inode(parent_inode), name, mode, flags, ctx)
        fi = pyfuse3.FileInfo(fh=i.ino, keep_cache=True)
        if self.files_without_open and flags & os.O_ACCMODE == os.O_WRONLY and not flags & os.O_APPEND:
            # (an appender is likely a log someone tails: it keeps the page cache)
            fi.direct_io = True
        return fi, self._entry(i, st)

    @_fuse_errors
    async def open(self, inode, flags, ctx):
        if self.files_without_open:
            # the kernel opens files itself from now on (keep_cache, no RELEASE)
            raise FUSEError(errno.ENOSYS)
        i = self._inode(inode)
        if (flags & os.O_ACCMODE != os.O_RDONLY) and not (flags & os.O_TRUNC) and not i.upper:
            self.union.require_writable()
            await self._copy_up(i)
        self.union.open(i, flags, ctx.uid)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    @_fuse_errors
    async def read(self, fh, off, size):
        fd = self.union.read_fd(self._inode(fh))
        if size <= self.splice_max:
            # pyfuse3 patch 0009: libfuse splices the reply from the fd (no copy
            # through Python: one memory copy per byte fewer than pread + writev)
            return fd
        return os.pread(fd, size, off)

    @_fuse_errors
    async def write(self, fh, off, buf, kill_suidgid=False):
        i = self.union.inodes.get(fh)
        if i is None or not i.upper:       # _for_write's work, inline on the busiest request
            i = await self._for_write(fh)
        return self.union.write(i, off, buf, kill_suidgid)

    async def _launder(self, ino: int) -> None:
        """Have the kernel write this inode's dirty pages back (and drop its pages).

        The notification blocks until the WRITEs it causes are answered, so it runs
        in a thread while the loop serves them."""
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
        except OSError as e:
            if e.errno != errno.ENOENT:       # ENOENT: the kernel holds no pages of it
                raise

    async def flush(self, fh):
        # writes go straight to the host file: nothing to flush. ENOSYS makes the
        # kernel stop sending FLUSH on every close().
        raise FUSEError(errno.ENOSYS)

    async def release(self, fh):
        # fds are kept per inode (fs/core/filefds.py), not per open
        pass

    @_fuse_errors
    async def fsync(self, fh, datasync):
        if self.fsync_enabled:
            self.union.fsync(self._inode(fh), datasync)

    @_fuse_errors
    async def fallocate(self, fh, mode, offset, length):
        # needs the patched pyfuse3 (third_party/pyfuse3); the kernel has checked
        # that the file is open for writing
        i = await self._for_write(fh)
        if self.writeback:
            await self._launder(fh)   # allocation next to pages the host has not seen: st_blocks
        spaceops.fallocate(self.union.write_fd(i), mode, offset, length)
        i.attr = None

    @_fuse_errors
    async def lseek(self, fh, offset, whence):
        if self.writeback and whence in (os.SEEK_DATA, os.SEEK_HOLE):
            await self._launder(fh)           # data still in the kernel is data
        return spaceops.lseek(self.union.read_fd(self._inode(fh)), offset, whence)

    @_fuse_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        u = self.union
        i = self._inode(inode)
        if u.setattr_is_noop(i, attr, fields):
            return u.attr(i)
        if u.setattr_copies_data(i, attr, fields):
            await self._copy_up(i)       # big files off the loop
        u.setattr(i, attr, fields, ctx, on_open_file=fh is not None,
                  kernel_opens_files=self.files_without_open, killpriv_v2=pyfuse3.killpriv_v2_active())
        return u.attr(i)

    @_fuse_errors
    async def access(self, inode, mode, ctx):
        # asked only where the kernel does not check (a private rootless mount)
        return self.union.may_access(self._inode(inode), mode, ctx, lambda: _sup_groups(ctx.pid))

    @_fuse_errors
    async def statfs(self, ctx):
        v = self.union.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = v.f_bsize
        s.f_frsize = v.f_frsize
        s.f_blocks = v.f_blocks
        s.f_bfree = v.f_bfree
        s.f_bavail = v.f_bavail
        s.f_files = v.f_files
        s.f_ffree = v.f_ffree
        s.f_favail = v.f_favail
        s.f_namemax = 255
        return s

    # ------------------------------------------------------------------ recording
    def _note(self, ino: int) -> None:
        log = self.access_log
        if ino in log.seen:
            return
        i = self.union.inodes.get(ino)
        if i is not None and i.kind == S.S_IFREG:
            log.note(i, self.union.attr(i).st_size)

    async def _read_recorded(self, fh, off, size):
        self._note(fh)
        return await Operations.read(self, fh, off, size)

    async def _write_recorded(self, fh, off, buf, kill_suidgid=False):
        n = await Operations.write(self, fh, off, buf, kill_suidgid)
        self._note(fh)
        return n

    async def _lookup_recorded(self, parent_inode, name, ctx=None):
        a = await Operations.lookup(self, parent_inode, name, ctx)
        if a.st_ino and a.st_size == 0:
            self._note(a.st_ino)
        return a

    async def _create_recorded(self, parent_inode, name, mode, flags, ctx):
        fi, a = await Operations.create(self, parent_inode, name, mode, flags, ctx)
        self._note(a.st_ino)
        return fi, a

    async def _mknod_recorded(self, parent_inode, name, mode, rdev, ctx):
        a = await Operations.mknod(self, parent_inode, name, mode, rdev, ctx)
        self._note(a.st_ino)
        return a

    # ------------------------------------------------------------------ xattrs
    @_fuse_errors
    async def getxattr(self, inode, name, ctx):
        if self.noxattrs:
            raise FUSEError(errno.ENOSYS)
        return self.union.getxattr(self._inode(inode), name)

    @_fuse_errors
    async def listxattr(self, inode, ctx):
        if self.noxattrs:
            raise FUSEError(errno.ENOSYS)
        return self.union.listxattr(self._inode(inode))

    @_fuse_errors
    async def setxattr(self, inode, name, value, ctx):
        if self.noxattrs:
            raise FUSEError(errno.ENOSYS)
        i = self._inode(inode)
        await self._copy_up(i)
        self.union.setxattr(i, name, value)

    @_fuse_errors
    async def removexattr(self, inode, name, ctx):
        if self.noxattrs:
            raise FUSEError(errno.ENOSYS)
        self.union.removexattr(self._inode(inode), name)
