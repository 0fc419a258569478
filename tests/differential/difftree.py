"""Snapshot of a merged tree, and the comparison of two snapshots.

What is compared: type, permission bits (incl. setuid/setgid/sticky), owner, size
(non-directories), content hash, symlink target, user.* xattrs, hard-link groups
(sets of names sharing an inode), and the readdir d_type of every entry (must match
lstat). mtime is compared where it is meaningful: every time the generators set
lies in 2001..2010, anything the filesystem stamped itself is "now", so an mtime
is compared exactly when it is old on either side (copy-up and rename must keep it)
and otherwise only required to be recent on both sides (a write must update it).
Never compared: atime, ctime, st_ino/st_dev values, st_nlink, directory sizes.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from difflowers import T_MAX

RECENT = "recent"


@dataclass
class Tree:
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    links: list[list[str]] = field(default_factory=list)  # hard-link groups, sorted
    problems: list[str] = field(default_factory=list)  # internal inconsistencies seen


def _mtime(ns: int) -> int | str:
    return ns if ns < T_MAX else RECENT


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "reg"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "chr"), (stat.S_ISBLK, "blk"),
                       (stat.S_ISSOCK, "sock")):
        if test(mode):
            return name
    return "?"


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        total = 0
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            h.update(b)
            total += len(b)
            if total > 64 << 20:
                return "endless"
    finally:
        os.close(fd)
    return h.hexdigest()[:16]


def snapshot(root: str, dir_mtimes: bool = True) -> Tree:
    """Everything comparable about the tree below root (root itself included as '.')."""
    tree = Tree()
    inodes: dict[int, list[str]] = {}
    root_dev = os.lstat(root).st_dev

    def record(path: str, rel: str, dtype_kind: str | None) -> str:
        st = os.lstat(path)
        kind = _kind(st.st_mode)
        if dtype_kind is not None and dtype_kind != kind:
            tree.problems.append(f"{rel}: readdir d_type says {dtype_kind}, lstat says {kind}")
        if st.st_dev != root_dev:
            tree.problems.append(f"{rel}: st_dev {st.st_dev} differs from the mount's {root_dev}")
        e: dict[str, Any] = {"kind": kind, "mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid, "gid": st.st_gid}
        if kind != "dir" or dir_mtimes:
            e["mtime"] = _mtime(st.st_mtime_ns)
        if kind != "dir":
            e["size"] = st.st_size
        if kind == "reg":
            e["sha"] = _file_hash(path)
        if kind == "symlink":
            e["target"] = os.readlink(path)
        if kind in ("chr", "blk"):
            e["rdev"] = st.st_rdev
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as ex:
            names = []
            tree.problems.append(f"{rel}: listxattr failed: {ex.strerror}")
        xs = {}
        for n in sorted(names):
            if n.startswith("user."):
                try:
                    xs[n] = os.getxattr(path, n, follow_symlinks=False).hex()
                except OSError as ex:
                    xs[n] = f"<{ex.strerror}>"
        if xs:
            e["xattrs"] = xs
        tree.entries[rel] = e
        if kind != "dir":
            inodes.setdefault(st.st_ino, []).append(rel)
        return kind

    def rec(d: str, rel: str) -> None:
        try:
            with os.scandir(d) as it:
                ents = list(it)
        except OSError as ex:
            tree.problems.append(f"{rel or '.'}: readdir failed: {ex.strerror}")
            return
        names = [e.name for e in ents]
        if len(names) != len(set(names)):
            tree.problems.append(f"{rel or '.'}: readdir returned duplicates: {sorted(names)}")
        for e in sorted(ents, key=lambda e: e.name):
            r = f"{rel}/{e.name}" if rel else e.name
            if e.is_symlink():
                dk = "symlink"
            elif e.is_dir(follow_symlinks=False):
                dk = "dir"
            elif e.is_file(follow_symlinks=False):
                dk = "reg"
            else:
                dk = None
            try:
                kind = record(e.path, r, dk)
            except OSError as ex:
                tree.problems.append(f"{r}: listed by readdir but lstat failed: {ex.strerror}")
                continue
            if kind == "dir":
                rec(e.path, r)

    record(root, ".", None)
    rec(root, "")
    tree.links = sorted(sorted(v) for v in inodes.values() if len(v) > 1)
    return tree


def compare(ref: Tree, got: Tree, ref_name: str = "ref", got_name: str = "got") -> list[str]:
    """Human-readable differences; empty when the trees are equivalent."""
    out: list[str] = [f"{ref_name}: {p}" for p in ref.problems] + [f"{got_name}: {p}" for p in got.problems]
    for path in sorted(set(ref.entries) | set(got.entries)):
        a, b = ref.entries.get(path), got.entries.get(path)
        if a is None:
            out.append(f"{path}: only in {got_name}: {b}")
        elif b is None:
            out.append(f"{path}: only in {ref_name}: {a}")
        elif a != b:
            diffs = ", ".join(
                f"{k} {ref_name}={a.get(k)!r} {got_name}={b.get(k)!r}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            )
            out.append(f"{path}: {diffs}")
    if ref.links != got.links:
        out.append(f"hard-link groups: {ref_name}={ref.links} {got_name}={got.links}")
    return out
