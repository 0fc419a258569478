"""Copy-up, deletes, rmdir of merged dirs, mkdir over whiteouts, and renaming lower directories;
the last test remounts the same upper and expects the same tree.

Checks go through the mount; the upper directory is inspected only for what the issue pins down
(whiteout only when needed, opaque dir after mkdir over a whiteout, copy-up keeps hard links as one
copy). Kernel overlayfs copies hard-link groups up lazily (index=on), so the on-disk hard-link check
is fusesnap-only; renaming lower dirs works on the kernel too here because of redirect_dir=on.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from helpers import is_root
from unionmount import (KINDS, Union, built_union, errno_of, is_opaque_in_upper, is_whiteout_in_upper, mkdir,
                        mkfile, snapshot_tree, tree_diff, upper_has_name)

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root to mount and to set owners")

T1 = 1_000_000_000_111_111_111
T2 = 1_100_000_000_222_222_222
XATTRS = {"user.one": b"1", "trusted.two": b"2", "security.three": b"3"}


def _build(l0: Path, l1: Path) -> None:
    mkfile(l1 / "ro" / "f", "read me")
    mkfile(l1 / "cu" / "data", "0123456789", 0o741, uid=1234, gid=5678, mtime_ns=T1, xattrs=XATTRS)
    mkfile(l1 / "cu" / "meta", "meta data", 0o604, uid=42, gid=43, mtime_ns=T1, xattrs=XATTRS)
    mkdir(l1 / "par" / "a" / "b", 0o710, uid=13, gid=14, mtime_ns=T2, xattrs={"user.b": b"B"})
    mkfile(l1 / "par" / "a" / "b" / "f", "deep")
    mkdir(l1 / "par" / "a", 0o750, uid=11, gid=12, mtime_ns=T1, xattrs={"user.a": b"A"})
    mkdir(l1 / "sgid", 0o2755, gid=1234)
    mkfile(l1 / "sgid" / "f", "f", 0o2711, uid=0, gid=0)
    mkfile(l1 / "hl" / "a", "linked")
    os.link(l1 / "hl" / "a", l1 / "hl" / "b")
    mkdir(l1 / "hl" / "sub")
    os.link(l1 / "hl" / "a", l1 / "hl" / "sub" / "c")
    for n in ("lower", "modified"):
        mkfile(l1 / "del" / n, n)
    mkfile(l1 / "rmd" / "d" / "x", "x")
    mkfile(l0 / "rmd" / "d" / "y", "y")
    mkfile(l1 / "rmd" / "full" / "x", "x")
    mkfile(l1 / "mkd" / "e" / "a", "a")
    mkfile(l1 / "mkd" / "e" / "b" / "c", "c")
    mkfile(l1 / "mkd" / "f", "was a file")
    # a lower directory to rename: contents from two layers, dirs with metadata
    mkfile(l1 / "ren" / "src" / "f1", "one")
    mkfile(l0 / "ren" / "src" / "f0", "zero")
    mkfile(l1 / "ren" / "src" / "gone", "whited out before the rename")
    mkfile(l1 / "ren" / "src" / "sub" / "deep" / "f3", "three")
    mkdir(l1 / "ren" / "src" / "sub", 0o705, uid=7, gid=8, mtime_ns=T1, xattrs={"user.s": b"S"})
    mkfile(l1 / "ren" / "x" / "inner" / "f", "inner")
    mkdir(l1 / "ren" / "y")
    mkdir(l1 / "ren" / "emptytarget")
    mkfile(l1 / "race" / "one", "base\n")
    mkfile(l1 / "race" / "h1", "base\n")
    for i in range(2, 9):
        os.link(l1 / "race" / "h1", l1 / "race" / f"h{i}")
    mkfile(l1 / "wo" / "b", "lower-b")
    mkfile(l1 / "wo" / "w" / "lower1", "1")
    mkfile(l1 / "wo" / "w" / "sub" / "lower2", "2")
    mkfile(l1 / "wo" / "q" / "qf", "q")
    mkfile(l1 / "wo" / "r" / "content", "r")
    mkfile(l1 / "wo" / "z", "lower-z")


@pytest.fixture(scope="module", params=KINDS)
def u(request):
    with built_union(request.param, _build) as un:
        yield un


def _meta(p: Path) -> tuple:
    st = os.lstat(p)
    xs = {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)}
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, xs


def test_reading_does_not_copy_up(u: Union):
    f = u.p("ro", "f")
    assert f.read_text() == "read me"
    os.lstat(f)
    os.listxattr(f)
    os.access(f, os.W_OK)
    assert not upper_has_name(u.upper, "ro/f")


def test_copy_up_on_write_preserves_data_mode_owner_xattrs(u: Union):
    f = u.p("cu", "data")
    with open(f, "ab") as fh:
        fh.write(b"+")
    st = os.lstat(f)
    assert f.read_bytes() == b"0123456789+"
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o741, 1234, 5678)
    for k, v in XATTRS.items():
        assert os.getxattr(f, k) == v
    up = os.lstat(u.up("cu", "data"))
    assert (stat.S_IMODE(up.st_mode), up.st_uid, up.st_gid) == (0o741, 1234, 5678)
    assert (u.lowers[1] / "cu" / "data").read_bytes() == b"0123456789"


def test_metadata_copy_up_preserves_times_and_data(u: Union):
    f = u.p("cu", "meta")
    os.setxattr(f, "user.added", b"+")
    mode, uid, gid, mtime, xs = _meta(f)
    assert (mode, uid, gid, mtime) == (0o604, 42, 43, T1)
    assert xs == {**XATTRS, "user.added": b"+"}
    assert f.read_text() == "meta data"
    assert os.lstat(u.up("cu", "meta")).st_mtime_ns == T1


def test_copy_up_in_a_setgid_dir_keeps_the_files_group(u: Union):
    f = u.p("sgid", "f")
    with open(f, "a") as fh:
        fh.write("+")
    st = os.lstat(f)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o2711)
    up = os.lstat(u.up("sgid", "f"))
    assert (up.st_uid, up.st_gid) == (0, 0), "the upper copy took the setgid parent's group"
    g = os.lstat(u.p("sgid"))
    assert (g.st_gid, stat.S_IMODE(g.st_mode)) == (1234, 0o2755)


def test_parent_directories_copied_up_with_their_metadata(u: Union):
    before = {p: _meta(u.p(*p.split("/"))) for p in ("par/a", "par/a/b")}
    with open(u.p("par", "a", "b", "f"), "a") as fh:
        fh.write("!")
    for p, meta in before.items():
        assert _meta(u.p(*p.split("/"))) == meta, p
        st = os.lstat(u.up(*p.split("/")))
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == meta[:3], f"upper {p}"
        assert os.getxattr(u.up(*p.split("/")), "user." + p[-1]) == meta[4]["user." + p[-1]]
        assert st.st_mtime_ns == meta[3], f"upper {p}: mtime not restored after the copy-up below it"
    assert u.p("par", "a", "b", "f").read_text() == "deep!"


def test_copy_up_keeps_hard_links_together(u: Union):
    names = [("hl", "a"), ("hl", "b"), ("hl", "sub", "c")]
    ino = os.lstat(u.p(*names[0])).st_ino
    with open(u.p("hl", "b"), "a") as fh:
        fh.write("+")
    for n in names:
        st = os.lstat(u.p(*n))
        assert u.p(*n).read_text() == "linked+", n
        assert (st.st_ino, st.st_nlink) == (ino, 3), n
    os.chmod(u.p("hl", "sub", "c"), 0o600)
    assert {stat.S_IMODE(os.lstat(u.p(*n)).st_mode) for n in names} == {0o600}
    os.symlink("a", u.p("hl", "sl"))  # hard links between symlinks
    os.link(u.p("hl", "sl"), u.p("hl", "sub", "sl2"), follow_symlinks=False)
    assert os.lstat(u.p("hl", "sl")).st_ino == os.lstat(u.p("hl", "sub", "sl2")).st_ino
    if u.is_fusesnap:  # one copy in the upper, all names
        inos = {os.lstat(u.up(*n)).st_ino for n in names}
        assert len(inos) == 1 and os.lstat(u.up(*names[0])).st_nlink == 3


def test_deletes_whiteout_only_names_that_exist_below(u: Union):
    d = u.p("del")
    with open(d / "modified", "a") as fh:
        fh.write("!")  # copied up first
    (d / "new").write_text("upper only")
    os.mkdir(d / "newdir")
    for n in ("lower", "modified", "new"):
        os.unlink(d / n)
    os.rmdir(d / "newdir")
    assert os.listdir(d) == []
    assert is_whiteout_in_upper(u.upper, "del/lower")
    assert is_whiteout_in_upper(u.upper, "del/modified")
    assert not upper_has_name(u.upper, "del/new")
    assert not upper_has_name(u.upper, "del/newdir")
    assert errno_of(os.lstat, d / "lower") == errno.ENOENT


def test_rmdir_of_merged_dir_that_looks_empty(u: Union):
    d = u.p("rmd", "d")
    (d / "z").write_text("upper")
    assert sorted(os.listdir(d)) == ["x", "y", "z"]
    assert errno_of(os.rmdir, d) == errno.ENOTEMPTY
    for n in ("x", "y", "z"):
        os.unlink(d / n)
    os.rmdir(d)
    assert sorted(os.listdir(u.p("rmd"))) == ["full"]
    assert is_whiteout_in_upper(u.upper, "rmd/d")
    assert errno_of(os.rmdir, u.p("rmd", "full")) == errno.ENOTEMPTY
    os.mkdir(d)  # back over the whiteout: nothing from below shows through
    assert os.listdir(d) == []


def test_mkdir_over_whiteout_makes_an_opaque_dir(u: Union):
    m = u.p("mkd")
    os.unlink(m / "e" / "b" / "c")
    os.rmdir(m / "e" / "b")
    os.unlink(m / "e" / "a")
    os.rmdir(m / "e")
    os.mkdir(m / "e")
    assert os.listdir(m / "e") == []
    assert errno_of(os.lstat, m / "e" / "a") == errno.ENOENT
    assert is_opaque_in_upper(u.up("mkd", "e"))
    (m / "e" / "a").write_text("new a")
    assert os.listdir(m / "e") == ["a"]
    os.unlink(m / "f")
    os.mkdir(m / "f")  # a file below, a dir now
    assert os.listdir(m / "f") == [] and os.path.isdir(m / "f")
    assert not [x for x in os.listxattr(m / "e") if x.startswith(("trusted.overlay.", "user.overlay.",
                                                                  "user.fuseoverlayfs."))]


def test_renaming_lower_directories(u: Union):
    r = u.p("ren")
    os.unlink(r / "src" / "gone")
    (r / "src" / "added").write_text("added before the rename")
    want = snapshot_tree(r / "src")
    sub_ino = os.lstat(r / "src" / "sub").st_ino
    wfd = os.open(r / "src" / "f1", os.O_RDWR)  # open handles must follow the renamed dir
    rfd = os.open(r / "src" / "sub" / "deep" / "f3", os.O_RDONLY)
    try:
        os.rename(r / "src", r / "dst")
        os.pwrite(wfd, b"ONE", 0)
        assert os.pread(rfd, 10, 0) == b"three"
    finally:
        os.close(wfd)
        os.close(rfd)
    assert (r / "dst" / "f1").read_text() == "ONE", "write through a handle opened before the rename"
    assert errno_of(os.lstat, r / "src") == errno.ENOENT
    got = snapshot_tree(r / "dst")
    want["f1"] = got["f1"]
    assert not tree_diff(want, got)
    assert os.lstat(r / "dst" / "sub").st_ino == sub_ino
    (r / "dst" / "sub" / "later").write_text("after")
    os.rename(r / "dst", r / "dst2")  # a renamed dir renamed again
    assert (r / "dst2" / "sub" / "later").read_text() == "after"
    os.rename(r / "x" / "inner", r / "y" / "inner")  # into another lower dir
    assert (r / "y" / "inner" / "f").read_text() == "inner" and os.listdir(r / "x") == []
    os.rename(r / "dst2" / "sub", r / "emptytarget")  # over an empty dir
    assert (r / "emptytarget" / "deep" / "f3").read_text() == "three"
    assert sorted(os.listdir(r / "dst2")) == ["added", "f0", "f1"]
    os.mkdir(r / "src")  # the old name is free and shows nothing of the old contents
    assert os.listdir(r / "src") == []


def test_concurrent_first_writes_copy_up_once(u: Union):
    """Eight writers hit the same lower file (and eight names of one lower inode) at once."""
    import threading

    def append(path: Path, line: str, barrier: threading.Barrier) -> None:
        barrier.wait()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    for names in (["one"] * 8, [f"h{i}" for i in range(1, 9)]):
        barrier = threading.Barrier(len(names))
        ts = [threading.Thread(target=append, args=(u.p("race", n), f"w{i}\n", barrier))
              for i, n in enumerate(names)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        lines = u.p("race", names[0]).read_text().splitlines()
        assert lines[0] == "base" and sorted(lines[1:]) == [f"w{i}" for i in range(8)], lines
    assert len({os.lstat(u.p("race", f"h{i}")).st_ino for i in range(1, 9)}) == 1
    assert {u.p("race", f"h{i}").read_text() for i in range(1, 9)} == {u.p("race", "h1").read_text()}


def test_renames_keep_whiteouts_and_opacity(u: Union):
    """Names that hid something below keep hiding it after renames (before and after a remount)."""
    w = u.p("wo")
    (w / "new").write_text("upper")
    os.rename(w / "new", w / "b")  # over a lower-only file
    os.rename(w / "b", w / "c")  # ...and away again: lower b must not come back
    assert errno_of(os.lstat, w / "b") == errno.ENOENT
    assert (w / "c").read_text() == "upper"

    os.unlink(w / "w" / "sub" / "lower2")
    os.rmdir(w / "w" / "sub")
    os.unlink(w / "w" / "lower1")
    os.rmdir(w / "w")  # whiteout for a lower dir
    os.mkdir(w / "x")  # an upper-only dir...
    (w / "x" / "f").write_text("f")
    os.rename(w / "x", w / "w")  # ...renamed onto the whiteout: must not merge with lower w
    assert sorted(os.listdir(w / "w")) == ["f"]

    os.unlink(w / "q" / "qf")
    os.rmdir(w / "q")
    os.mkdir(w / "q")  # opaque
    os.unlink(w / "r" / "content")  # r looks empty now
    os.rename(w / "q", w / "r")  # the opaque dir replaces r: r's lower content stays hidden
    assert os.listdir(w / "r") == []
    assert errno_of(os.lstat, w / "q") == errno.ENOENT

    (w / "z").unlink()
    (w / "z").write_text("again")
    os.unlink(w / "z")
    assert errno_of(os.lstat, w / "z") == errno.ENOENT
    assert sorted(os.listdir(w)) == ["c", "r", "w"]


def test_everything_survives_a_remount(u: Union):
    """Last in this module: remount the same upper, the whole merged tree must be unchanged."""
    before = snapshot_tree(u.mnt)
    inos = {k: os.lstat(u.p(*k.split("/"))).st_ino for k in ("hl/a", "hl/b", "hl/sub/c")}
    u.remount()
    assert os.lstat(u.p("hl", "sl")).st_ino == os.lstat(u.p("hl", "sub", "sl2")).st_ino, \
        "symlink hard links split by remount"
    assert not tree_diff(before, snapshot_tree(u.mnt))
    assert len({os.lstat(u.p(*k.split("/"))).st_ino for k in inos}) == 1, "hard links split by remount"
    assert os.lstat(u.p("hl", "a")).st_nlink == 3
