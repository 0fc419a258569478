"""Mount a union (kernel overlayfs or fusesnap-overlay) over real directories, for behaviour tests.

The same test body runs against kernel overlayfs (``redirect_dir=on,index=on``) to prove the
test itself right, and against ``fusesnap-overlay``, the program under test. Where the kernel
differs from what fusesnap promises, tests call :meth:`Union.only_fusesnap` with the reason.

Environment knobs (for validating the tests, not for CI):
- ``FUSESNAP_OVERLAY_KINDS``: comma list of kinds to parametrize over (default ``kernel,fusesnap``).
- ``FUSESNAP_OVERLAY_PROG``: command used for the ``fusesnap`` kind instead of the installed
  ``fusesnap-overlay`` console script (e.g. ``fuse-overlayfs`` to compare behaviour).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import pwd
import shlex
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import pytest

from helpers import is_mounted, run_as, script, unmount

KERNEL = "kernel"
FUSESNAP = "fusesnap"
KINDS: tuple[str, ...] = tuple(
    k for k in os.environ.get("FUSESNAP_OVERLAY_KINDS", f"{KERNEL},{FUSESNAP}").split(",") if k
)
MOUNT_TIMEOUT = 60.0

# Names of every marker xattr a union filesystem may keep for itself (never shown to users).
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
INTERNAL_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.", "user.containers.")
OVERRIDE_XATTRS = ("user.containers.override_stat", "user.fuseoverlayfs.override_stat")


def overlay_cmd() -> list[str]:
    """The command that runs the mount program under test."""
    prog = os.environ.get("FUSESNAP_OVERLAY_PROG")
    return shlex.split(prog) if prog else [script("fusesnap-overlay")]


def escape_lower(path: str | os.PathLike) -> str:
    """One lowerdir item: ':' escaped as '\\:' (fuse-overlayfs >= 1.15 and the issue's syntax)."""
    return str(path).replace("\\", "\\\\").replace(":", "\\:")


def overlay_opts(lowers: Sequence[str | os.PathLike], upper: str | os.PathLike | None,
                 work: str | os.PathLike | None, extra: Iterable[str] = ()) -> str:
    parts = ["lowerdir=" + ":".join(escape_lower(p) for p in lowers)]
    if upper is not None:
        parts.append(f"upperdir={upper}")
    if work is not None:
        parts.append(f"workdir={work}")
    parts.extend(extra)
    return ",".join(parts)


# --------------------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
    """True while pid runs (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def daemon_pids(mnt: str | os.PathLike) -> list[int]:
    """Live processes whose command line names the mount point (the FUSE daemon)."""
    target = {str(mnt), os.path.realpath(mnt)}
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if any(a in target for a in args) and pid_alive(int(d)):
            found.append(int(d))
    return found


def wait_gone(pids: Iterable[int], timeout: float = 15.0) -> list[int]:
    """Wait until all pids exited; return those still alive after timeout."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p in pids if pid_alive(p)]
        if not pids:
            return []
        time.sleep(0.05)
    return pids


# --------------------------------------------------------------------------- mounts


@dataclass
class MountError(Exception):
    """The mount program failed: its exit code and stderr."""

    returncode: int
    stderr: str

    def __str__(self) -> str:
        return f"mount failed (exit {self.returncode}): {self.stderr.strip()}"


@dataclass
class Union:
    """A live union mount over real directories, and how to remount/unmount it."""

    kind: str
    mnt: Path
    lowers: list[Path]
    upper: Path | None
    work: Path | None
    extra: list[str] = field(default_factory=list)
    user: pwd.struct_passwd | None = None
    stderr: str = ""
    pids: list[int] = field(default_factory=list)

    @property
    def is_fusesnap(self) -> bool:
        return self.kind == FUSESNAP

    def p(self, *parts: str) -> Path:
        """Path inside the mount."""
        return self.mnt.joinpath(*parts)

    def up(self, *parts: str) -> Path:
        """Path inside the upper directory (the on-disk format)."""
        assert self.upper is not None
        return self.upper.joinpath(*parts)

    def only_fusesnap(self, why: str) -> None:
        """Skip on kernel overlayfs where it differs from the issue's contract (why says how)."""
        if self.kind == KERNEL:
            pytest.skip(f"kernel overlayfs differs: {why}")

    def unmount(self) -> None:
        if self.user is not None:
            run_as(self.user, ["fusermount3", "-u", str(self.mnt)])
        if is_mounted(self.mnt):
            unmount(self.mnt)
        left = wait_gone(self.pids)
        assert not left, f"daemon {left} still running after unmount of {self.mnt}"

    def remount(self) -> None:
        self.unmount()
        again = mount_union(self.kind, self.mnt, self.lowers, self.upper, self.work, self.extra,
                            user=self.user)
        self.stderr, self.pids = again.stderr, again.pids


def mount_union(kind: str, mnt: Path, lowers: Sequence[Path], upper: Path | None = None,
                work: Path | None = None, extra: Iterable[str] = (), *,
                user: pwd.struct_passwd | None = None) -> Union:
    """Mount and return only once the mount is live; raise MountError on failure.

    For fusesnap the program must daemonize only after the mount is live, so the
    mount is checked right after the program returns, without waiting.
    """
    extra = list(extra)
    mnt.mkdir(parents=True, exist_ok=True)
    if kind == KERNEL:
        kopts = list(extra)
        if upper is not None:
            kopts += ["redirect_dir=on", "index=on"]
        opts = overlay_opts(lowers, upper, work, kopts)
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise MountError(r.returncode, r.stderr)
        return Union(kind, mnt, list(lowers), upper, work, extra, None, r.stderr)
    if kind != FUSESNAP:
        raise ValueError(kind)
    opts = overlay_opts(lowers, upper, work, extra)
    rc, err = run_overlay(["-o", opts, str(mnt)], user=user)
    if rc != 0:
        raise MountError(rc, err)
    if not is_mounted(mnt):
        raise AssertionError(f"fusesnap-overlay exited 0 before {mnt} was mounted; stderr: {err}")
    return Union(kind, mnt, list(lowers), upper, work, extra, user, err, daemon_pids(mnt))


def run_overlay(args: list[str], *, user: pwd.struct_passwd | None = None, cwd: str | os.PathLike | None = None,
                timeout: float = MOUNT_TIMEOUT, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the mount program (stderr to a file: a daemon may keep it); return (rc, stderr)."""
    with tempfile.TemporaryFile(mode="w+") as errf:
        cmd = overlay_cmd() + args
        if user is not None:
            r = run_as(user, cmd, stdout=subprocess.DEVNULL, stderr=errf, capture_output=False,
                       cwd=cwd, timeout=timeout, env=env)
        else:
            r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=errf, cwd=cwd, timeout=timeout,
                               env=env)
        errf.seek(0)
        return r.returncode, errf.read()


@contextlib.contextmanager
def scratch(prefix: str = "fusesnap-ov-") -> Iterator[Path]:
    """A world-enterable temp dir for module-scoped mounts; unmounts leftovers on exit."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    os.chmod(d, 0o777)
    try:
        yield d
    finally:
        with open("/proc/self/mountinfo") as f:
            mps = [line.split()[4] for line in f]
        for mp in sorted((m for m in mps if m.startswith(str(d))), key=len, reverse=True):
            pids = daemon_pids(mp)
            with contextlib.suppress(Exception):
                unmount(mp)
            wait_gone(pids, 5)
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def built_union(kind: str, build: Callable[..., None], nlowers: int = 2,
                extra: Iterable[str] = ()) -> Iterator[Union]:
    """A mount of `kind` over nlowers lowers filled by build(*lowers); unmounted and removed after."""
    with scratch() as base:
        lowers, upper, work, mnt = layout(base, nlowers)
        build(*lowers)
        un = mount_union(kind, mnt, lowers, upper, work, extra)
        try:
            yield un
        finally:
            un.unmount()


def layout(base: Path, nlowers: int = 1) -> tuple[list[Path], Path, Path, Path]:
    """Fresh lower dirs l0 (uppermost) .. l{n-1}, upper, work and mount point under base."""
    lowers = [base / f"l{i}" for i in range(nlowers)]
    for d in lowers:
        d.mkdir(parents=True)
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    return lowers, upper, work, mnt


# --------------------------------------------------------------------------- building trees


def mkfile(path: Path, data: bytes | str = b"", mode: int = 0o644, *, uid: int | None = None,
           gid: int | None = None, mtime_ns: int | None = None, xattrs: dict[str, bytes] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    _meta(path, mode, uid, gid, mtime_ns, xattrs)
    return path


def mkdir(path: Path, mode: int = 0o755, *, uid: int | None = None, gid: int | None = None,
          mtime_ns: int | None = None, xattrs: dict[str, bytes] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    _meta(path, mode, uid, gid, mtime_ns, xattrs)
    return path


def mkwhiteout(path: Path) -> Path:
    """A char 0/0 whiteout (needs root or a user namespace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    return path


def _meta(path: Path, mode: int, uid: int | None, gid: int | None, mtime_ns: int | None,
          xattrs: dict[str, bytes] | None) -> None:
    for k, v in (xattrs or {}).items():
        os.setxattr(path, k, v)
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
    os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def chown_tree(root: Path, uid: int, gid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [dirpath] + [os.path.join(dirpath, x) for x in dirnames + filenames]:
            os.chown(n, uid, gid, follow_symlinks=False)


def snapshot_tree(root: Path) -> dict[str, tuple]:
    """What a user sees under root: type+mode, owner, content hash, link target, xattrs, mtime, nlink.

    Comparing snapshots before and after a remount catches a daemon whose replies differ from what
    it stored (the kernel's attribute cache hides that while the mount lives).
    """
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            data = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            xs = tuple(sorted((x, os.getxattr(p, x, follow_symlinks=False))
                              for x in os.listxattr(p, follow_symlinks=False)))
            nlink = None if stat.S_ISDIR(st.st_mode) else st.st_nlink
            rdev = st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else None
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, data, link, xs, st.st_mtime_ns,
                                             nlink, rdev)
    return out


def tree_diff(before: dict[str, tuple], after: dict[str, tuple]) -> dict[str, tuple]:
    """Paths whose snapshot differs (None for a missing side): empty when equal."""
    return {k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)}


# --------------------------------------------------------------------------- upper format


def is_whiteout_in_upper(upper: Path, rel: str) -> bool:
    """NAME is whited out in the upper: char 0/0 NAME or an empty .wh.NAME beside it."""
    p = upper / rel
    try:
        st = os.lstat(p)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0):
            return True
    except FileNotFoundError:
        pass
    return os.path.lexists(p.parent / (".wh." + p.name))


def upper_has_name(upper: Path, rel: str) -> bool:
    """Anything at all for NAME in the upper (the name itself or a .wh.NAME marker)."""
    p = upper / rel
    return os.path.lexists(p) or os.path.lexists(p.parent / (".wh." + p.name))


def is_opaque_in_upper(d: Path) -> bool:
    for name in OPAQUE_XATTRS:
        with contextlib.suppress(OSError):
            if os.getxattr(d, name, follow_symlinks=False) == b"y":
                return True
    return os.path.lexists(d / ".wh..wh..opq")


def override_stat(p: Path) -> str | None:
    """The presented-metadata xattr a daemon stored on an upper file, if any."""
    for name in OVERRIDE_XATTRS:
        with contextlib.suppress(OSError):
            return os.getxattr(p, name, follow_symlinks=False).decode()
    return None


# --------------------------------------------------------------------------- syscalls


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
SYS_getdents64 = 217  # x86_64


def renameat2(old: str | os.PathLike, new: str | os.PathLike, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old))


FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) without glibc's posix_fallocate emulation."""
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: str | os.PathLike, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(2) with raw (sec, nsec) pairs, so UTIME_NOW / UTIME_OMIT can be passed."""
    ts = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(AT_FDCWD, os.fsencode(path), ts, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))


@dataclass
class Dirent:
    ino: int
    off: int
    dtype: int
    name: str


DT_NAMES = {1: "fifo", 2: "chr", 4: "dir", 6: "blk", 8: "reg", 10: "lnk", 12: "sock"}


def getdents(fd: int, bufsize: int = 32768) -> list[Dirent]:
    """One getdents64(2) call on a directory fd: raw entries with d_type and d_off."""
    buf = ctypes.create_string_buffer(bufsize)
    n = _libc.syscall(SYS_getdents64, fd, buf, bufsize)
    if n < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    out, pos, raw = [], 0, buf.raw[:n]
    while pos < n:
        ino, off, reclen, dtype = struct.unpack_from("<QqHB", raw, pos)
        name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
        out.append(Dirent(ino, off, dtype, os.fsdecode(name)))
        pos += reclen
    return out


def read_all_dents(fd: int, bufsize: int = 32768) -> list[Dirent]:
    out: list[Dirent] = []
    while True:
        chunk = getdents(fd, bufsize)
        if not chunk:
            return out
        out.extend(chunk)


def errno_of(fn, *args, **kw) -> int:
    """Call fn and return the errno it failed with (0 if it succeeded)."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno or -1
    return 0
