"""Seeded random filesystem operations, applied by path with plain os.* calls.

An op is a JSON-able dict (``{"op": "rename", "src": "a", "dst": "d/b", "flags": 0}``);
``apply(op, root)`` runs it under ``root`` and returns a result string: ``"ok"``,
``"ok:<value>"`` for ops that observe something (read, stat, listdir, xattrs), or the
errno name (``"ENOENT"``). Results of every target are compared op by op, so errno
differences are caught, not only differences in the final tree.

Ops are generated against the current state of the plain-directory oracle (so most of
them hit existing objects, with a share of missing/odd paths for the error paths), and
the resulting list is what gets replayed on every target and saved for --replay.

Safety: symlink targets are relative and never contain '..' (difflowers and
``_symlink_target``), so an op that follows a link stays inside the seed's tree.
Every open uses O_NONBLOCK so that fifos never block.

Differences between targets that are legitimate (see diffrun.PROFILES):
- kernel overlayfs with redirect_dir=on renames lower directories; fuse-overlayfs
  and kernel overlay without redirect_dir return EXDEV. fusesnap must succeed.
  When a *reference* returns EXDEV where the plain-directory oracle succeeded, the
  reference is retired for the rest of that seed and the oracle becomes the reference.
- st_nlink, st_ino, st_dev values, directory sizes, atime and ctime are never
  compared across targets (hard-link groups are compared instead).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import stat
from typing import Any, Callable

from difflowers import DEVICES, NAMES, T_MAX, T_MIN, XATTR_NAMES, data_bytes

Op = dict[str, Any]

USERS = [1000, 1234, 65534]  # owners difflowers also hands out
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
AT_SYMLINK_NOFOLLOW = 0x100


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_utimensat = _libc.utimensat
_utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_utimensat.restype = ctypes.c_int


def utimensat(path: str, atime: int | str, mtime: int | str, follow: bool) -> None:
    """utimensat(2) with "now"/"omit" for either time (os.utime cannot say omit)."""
    def ts(v: int | str) -> _Timespec:
        if v == "now":
            return _Timespec(0, UTIME_NOW)
        if v == "omit":
            return _Timespec(0, UTIME_OMIT)
        return _Timespec(int(v) // 10**9, int(v) % 10**9)

    times = (_Timespec * 2)(ts(atime), ts(mtime))
    flags = 0 if follow else AT_SYMLINK_NOFOLLOW
    if _utimensat(AT_FDCWD, os.fsencode(path), times, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)


def _fallocate(root: str, op: Op) -> str:
    fd = os.open(_p(root, op["path"]), os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.posix_fallocate(fd, op["offset"], op["length"])
        return f"ok:{os.fstat(fd).st_size}"
    finally:
        os.close(fd)


def renameat2(src: str, dst: str, flags: int) -> None:
    if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src)


def short_hash(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


# ---------------------------------------------------------------- applying


def _p(root: str, rel: str) -> str:
    return os.path.join(root, rel)


def _write(root: str, op: Op) -> str:
    flags = os.O_WRONLY | os.O_NONBLOCK
    if op.get("offset") is None:
        flags |= os.O_APPEND
    if op.get("trunc"):
        flags |= os.O_TRUNC
    fd = os.open(_p(root, op["path"]), flags)
    try:
        data = data_bytes(op["data"])
        if op.get("offset") is None:
            n = os.write(fd, data)
        else:
            n = os.pwrite(fd, data, op["offset"])
        return f"ok:{n}"
    finally:
        os.close(fd)


def _create(root: str, op: Op) -> str:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK
    if op.get("excl"):
        flags |= os.O_EXCL
    if op.get("trunc"):
        flags |= os.O_TRUNC
    fd = os.open(_p(root, op["path"]), flags, op["mode"])
    try:
        if op.get("data"):
            os.write(fd, data_bytes(op["data"]))
        return "ok"
    finally:
        os.close(fd)


READ_LIMIT = 16 << 20  # nothing the generators write is this big


def _read(root: str, op: Op) -> str:
    fd = os.open(_p(root, op["path"]), os.O_RDONLY | os.O_NONBLOCK)
    try:
        chunks = []
        total = 0
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > READ_LIMIT:
                return "ok:endless"
        data = b"".join(chunks)
        return f"ok:{len(data)}:{short_hash(data)}"
    finally:
        os.close(fd)


def _open_unlink(root: str, op: Op) -> str:
    """Open, unlink, then keep using the open file: it must stay readable/writable."""
    fd = os.open(_p(root, op["path"]), os.O_RDWR | os.O_NONBLOCK)
    try:
        os.unlink(_p(root, op["path"]))
        data = data_bytes(op["data"])
        os.pwrite(fd, data, 0)
        size = os.fstat(fd).st_size
        back = os.pread(fd, size, 0)
        return f"ok:{size}:{short_hash(back)}"
    finally:
        os.close(fd)


def _open_rename(root: str, op: Op) -> str:
    """Open, rename, then write through the old descriptor: the data must land in the
    object now found under the new name (checked by the final tree)."""
    fd = os.open(_p(root, op["src"]), os.O_RDWR | os.O_NONBLOCK)
    try:
        renameat2(_p(root, op["src"]), _p(root, op["dst"]), 0)
        n = os.pwrite(fd, data_bytes(op["data"]), op["offset"])
        return f"ok:{n}:{os.fstat(fd).st_size}"
    finally:
        os.close(fd)


def _rmtree(root: str, op: Op) -> str:
    """rm -rf in sorted order (first error stops it), then optionally mkdir the same
    name again: whiteouts for everything below, and an opaque dir over a lower one."""
    n = 0

    def rec(p: str) -> None:
        nonlocal n
        for name in sorted(os.listdir(p)):
            c = os.path.join(p, name)
            if stat.S_ISDIR(os.lstat(c).st_mode):
                rec(c)
                os.rmdir(c)
            else:
                os.unlink(c)
            n += 1

    top = _p(root, op["path"])
    if not stat.S_ISDIR(os.lstat(top).st_mode):
        raise OSError(errno.ENOTDIR, "not a directory", top)
    rec(top)
    os.rmdir(top)
    if op.get("mkdir") is not None:
        os.mkdir(top, op["mkdir"])
    return f"ok:{n}"


def _stat(root: str, op: Op) -> str:
    st = os.stat(_p(root, op["path"]), follow_symlinks=op.get("follow", False))
    t = stat.S_IFMT(st.st_mode)
    size = "" if stat.S_ISDIR(st.st_mode) else st.st_size
    return f"ok:{t:o}:{stat.S_IMODE(st.st_mode):o}:{st.st_uid}:{st.st_gid}:{size}"


def _listxattr(root: str, op: Op) -> str:
    names = os.listxattr(_p(root, op["path"]), follow_symlinks=op.get("follow", False))
    return "ok:" + ",".join(sorted(n for n in names if n.startswith("user.")))


def _getxattr(root: str, op: Op) -> str:
    return "ok:" + os.getxattr(_p(root, op["path"]), op["name"], follow_symlinks=op.get("follow", False)).hex()


APPLY: dict[str, Callable[[str, Op], Any]] = {
    "create": _create,
    "write": _write,
    "truncate": lambda r, o: os.truncate(_p(r, o["path"]), o["length"]),
    "read": _read,
    "chmod": lambda r, o: os.chmod(_p(r, o["path"]), o["mode"]),
    "chown": lambda r, o: os.chown(_p(r, o["path"]), o["uid"], o["gid"], follow_symlinks=o["follow"]),
    "utime": lambda r, o: os.utime(_p(r, o["path"]), ns=(o["mtime"], o["mtime"]), follow_symlinks=o["follow"]),
    "utimens": lambda r, o: utimensat(_p(r, o["path"]), o["atime"], o["mtime"], o["follow"]),
    "fallocate": _fallocate,
    "rename": lambda r, o: renameat2(_p(r, o["src"]), _p(r, o["dst"]), o["flags"]),
    "link": lambda r, o: os.link(_p(r, o["src"]), _p(r, o["dst"]), follow_symlinks=False),
    "symlink": lambda r, o: os.symlink(o["target"], _p(r, o["path"])),
    "unlink": lambda r, o: os.unlink(_p(r, o["path"])),
    "rmdir": lambda r, o: os.rmdir(_p(r, o["path"])),
    "mkdir": lambda r, o: os.mkdir(_p(r, o["path"]), o["mode"]),
    "mkfifo": lambda r, o: os.mkfifo(_p(r, o["path"]), o["mode"]),
    "mknod": lambda r, o: os.mknod(_p(r, o["path"]), stat.S_IFCHR | o["mode"], os.makedev(*o["rdev"])),
    "setxattr": lambda r, o: os.setxattr(
        _p(r, o["path"]), o["name"], bytes.fromhex(o["value"]), o["flags"], follow_symlinks=o["follow"]
    ),
    "removexattr": lambda r, o: os.removexattr(_p(r, o["path"]), o["name"], follow_symlinks=o["follow"]),
    "getxattr": _getxattr,
    "listxattr": _listxattr,
    "listdir": lambda r, o: "ok:" + ",".join(sorted(os.listdir(_p(r, o["path"])))),
    "stat": _stat,
    "open_unlink": _open_unlink,
    "open_rename": _open_rename,
    "rmtree": _rmtree,
}


def apply(op: Op, root: str) -> str:
    """Run one op under root; the result string is what targets are compared on.

    An op with "as": [uid, gid] runs with those credentials and no supplementary groups,
    so that permission checks (EACCES/EPERM) are compared too."""
    if op.get("as"):
        return _apply_as(op, root, *op["as"])
    return _apply(op, root)


def _apply_as(op: Op, root: str, uid: int, gid: int) -> str:
    """Switch the effective ids (and so the fs ids) around one op. The real uid stays 0,
    so switching back restores root's capabilities. Single-threaded callers only."""
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(gid)
    os.seteuid(uid)
    try:
        return _apply(op, root)
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def _apply(op: Op, root: str) -> str:
    try:
        out = APPLY[op["op"]](root, op)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else f"OSError:{e}"
    return out if isinstance(out, str) else "ok"


def describe(op: Op) -> str:
    """One line, shell-like, for reports and regression cases."""
    args = " ".join(f"{k}={v!r}" for k, v in op.items() if k != "op")
    return f"{op['op']} {args}"


# ---------------------------------------------------------------- generating

WEIGHTS = {
    "create": 9, "write": 11, "truncate": 5, "read": 5, "chmod": 6, "chown": 5, "utime": 3, "utimens": 2, "fallocate": 2,
    "rename": 15, "link": 6, "symlink": 4, "unlink": 9, "rmdir": 5, "mkdir": 8, "mkfifo": 1, "mknod": 1,
    "setxattr": 7, "removexattr": 3, "getxattr": 2, "listxattr": 2, "listdir": 4, "stat": 5,
    "open_unlink": 2, "open_rename": 2, "rmtree": 2,
}


def listing(root: str) -> list[tuple[str, str]]:
    """(relative path, kind) of everything under root, without following symlinks."""
    out: list[tuple[str, str]] = []

    def rec(d: str, rel: str) -> None:
        with os.scandir(d) as it:
            ents = sorted(it, key=lambda e: e.name)
        for e in ents:
            r = f"{rel}/{e.name}" if rel else e.name
            st = e.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                out.append((r, "dir"))
                rec(e.path, r)
            elif stat.S_ISLNK(st.st_mode):
                out.append((r, "symlink"))
            elif stat.S_ISREG(st.st_mode):
                out.append((r, "reg"))
            else:
                out.append((r, "other"))

    rec(root, "")
    return out


class Generator:
    """Picks the next op from the oracle's current tree (so most ops hit real objects)."""

    def __init__(self, seed: int, as_user: float = 0.15) -> None:
        self.rng = random.Random(f"ops-{seed}")
        self.as_user = as_user  # share of ops run as an unprivileged uid
        self.kinds = list(WEIGHTS)
        self.weights = [WEIGHTS[k] for k in self.kinds]

    def _data(self) -> list[int]:
        r = self.rng.random()
        n = self.rng.randrange(0, 200) if r < 0.5 else self.rng.randrange(200, 9000) if r < 0.95 else self.rng.randrange(60000, 200000)
        return [self.rng.randrange(2**31), n]

    def _mode(self, kind: str) -> int:
        if kind == "dir":
            return self.rng.choice([0o755, 0o700, 0o775, 0o1777, 0o2775, 0o500])
        return self.rng.choice([0o644, 0o600, 0o755, 0o4755, 0o2755, 0o6711, 0o444, 0o1644, 0o640])

    def next(self, oracle_root: str) -> Op:
        rng = self.rng
        ents = listing(oracle_root)
        dirs = [""] + [p for p, k in ents if k == "dir"]

        def existing(*kinds: str) -> str:
            cands = [p for p, k in ents if not kinds or k in kinds]
            if cands and rng.random() < 0.9:
                return rng.choice(cands)
            return odd()

        def fresh() -> str:
            d = rng.choice(dirs)
            name = rng.choice(NAMES) if rng.random() < 0.8 else f"n{rng.randrange(100)}"
            return f"{d}/{name}" if d else name

        def odd() -> str:
            r = rng.random()
            files = [p for p, k in ents if k in ("reg", "symlink")]
            if r < 0.4 and files:
                return f"{rng.choice(files)}/{rng.choice(NAMES)}"  # ENOTDIR or through a symlink
            return fresh()

        def target() -> str:
            return existing() if rng.random() < 0.35 else fresh()

        op_kind = rng.choices(self.kinds, self.weights)[0]
        op: Op = {"op": op_kind}
        if op_kind == "create":
            op.update(path=fresh() if rng.random() < 0.7 else existing("reg", "symlink"),
                      mode=self._mode("reg"), excl=rng.random() < 0.2, trunc=rng.random() < 0.3,
                      data=self._data() if rng.random() < 0.6 else None)
        elif op_kind == "write":
            off = None if rng.random() < 0.3 else rng.choice([0, 0, rng.randrange(0, 5000), rng.randrange(0, 400000)])
            op.update(path=existing("reg", "symlink"), data=self._data(), offset=off, trunc=rng.random() < 0.15)
        elif op_kind == "truncate":
            op.update(path=existing("reg", "symlink"),
                      length=rng.choice([0, rng.randrange(0, 3000), rng.randrange(0, 300000)]))
        elif op_kind in ("read", "open_unlink"):
            op.update(path=existing("reg"))
            if op_kind == "open_unlink":
                op["data"] = self._data()
        elif op_kind == "chmod":
            p = existing()
            op.update(path=p, mode=self._mode("dir" if dict(ents).get(p) == "dir" else "reg"))
        elif op_kind == "chown":
            op.update(path=existing(), uid=rng.choice([-1, 0, 1000, 1234, 65534]),
                      gid=rng.choice([-1, 0, 1000, 1234, 65534]), follow=rng.random() < 0.3)
        elif op_kind == "utime":
            op.update(path=existing(), mtime=rng.randrange(T_MIN, T_MAX), follow=rng.random() < 0.3)
        elif op_kind == "utimens":
            def t() -> int | str:
                return rng.choice(["now", "omit", rng.randrange(T_MIN, T_MAX)])
            op.update(path=existing(), atime=t(), mtime=t(), follow=rng.random() < 0.3)
        elif op_kind == "fallocate":
            op.update(path=existing("reg", "symlink"), offset=rng.randrange(0, 20000),
                      length=rng.randrange(1, 70000))
        elif op_kind == "rename":
            r = rng.random()
            flags = 0 if r < 0.8 else RENAME_NOREPLACE if r < 0.9 else RENAME_EXCHANGE
            src = existing("dir") if rng.random() < 0.4 else existing()
            op.update(src=src, dst=existing() if flags == RENAME_EXCHANGE or rng.random() < 0.3 else fresh(),
                      flags=flags)
        elif op_kind == "link":
            op.update(src=existing("reg", "symlink", "other"), dst=target())
        elif op_kind == "symlink":
            t = rng.choice(NAMES) if rng.random() < 0.7 else f"{rng.choice(NAMES)}/{rng.choice(NAMES)}"
            op.update(target=t, path=target())
        elif op_kind == "unlink":
            op.update(path=existing("reg", "symlink", "other") if rng.random() < 0.9 else existing())
        elif op_kind == "rmdir":
            empty = [p for p in dirs if p and not any(q.startswith(p + "/") for q, _ in ents)]
            op.update(path=rng.choice(empty) if empty and rng.random() < 0.5 else existing("dir"))
        elif op_kind == "rmtree":
            op.update(path=existing("dir"), mkdir=self._mode("dir") if rng.random() < 0.6 else None)
        elif op_kind == "open_rename":
            op.update(src=existing("reg"), dst=target(), data=self._data(),
                      offset=rng.choice([0, rng.randrange(0, 3000)]))
        elif op_kind in ("mkdir", "mkfifo", "mknod"):
            op.update(path=target(), mode=self._mode("dir") if op_kind == "mkdir" else 0o644)
            if op_kind == "mknod":
                op["rdev"] = rng.choice(DEVICES)
        elif op_kind in ("setxattr", "removexattr", "getxattr"):
            p = existing("reg", "dir") if rng.random() < 0.85 else existing()
            name = rng.choice(XATTR_NAMES + ["user.new"])
            if op_kind != "setxattr" and rng.random() < 0.6:
                try:
                    have = sorted(os.listxattr(os.path.join(oracle_root, p), follow_symlinks=False))
                except OSError:
                    have = []
                if have:
                    name = rng.choice(have)
            op.update(path=p, name=name, follow=rng.random() < 0.2)
            if op_kind == "setxattr":
                op.update(value=rng.randbytes(rng.choice([0, 1, 9, 60])).hex(),
                          flags=rng.choice([0, 0, 0, os.XATTR_CREATE, os.XATTR_REPLACE]))
        elif op_kind == "listxattr":
            op.update(path=existing(), follow=rng.random() < 0.2)
        elif op_kind == "listdir":
            op.update(path=existing("dir") if rng.random() < 0.9 else existing())
        elif op_kind == "stat":
            op.update(path=existing(), follow=rng.random() < 0.3)
        if self.as_user and rng.random() < self.as_user:
            u = rng.choice(USERS)
            op["as"] = [u, u]
        return op
