"""POSIX details users trip over: ENAMETOOLONG, paths deeper than PATH_MAX,
open-unlinked files, directory st_nlink, one st_dev, stable and shared inode numbers.

Kernel overlayfs differs in two places, asserted on fusesnap only: a merged directory reports
st_nlink 1, and a lower file opened read-only keeps st_nlink 1 after its last unlink (the fd
still refers to the lower inode).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from helpers import is_root
from unionmount import FUSESNAP, KINDS, Union, built_union, errno_of, layout, mkdir, mkfile, mount_union

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root to mount")

N255 = "n" * 255
N256 = "n" * 256
SEG = "s" * 200  # 25 levels of 201 bytes: deeper than PATH_MAX (4096)
DEPTH = 25


def _build(l0: Path, l1: Path) -> None:
    mkfile(l1 / "long" / N255, "255")
    mkfile(l1 / "long" / "short", "s")
    (l1 / "deep").mkdir()
    mkfile(l1 / "unl" / "rw", "lower rw")
    mkfile(l1 / "unl" / "ro", "lower ro")
    mkdir(l1 / "nl" / "merged" / "a")
    mkdir(l1 / "nl" / "merged" / "b")
    mkdir(l0 / "nl" / "merged" / "c")
    mkdir(l0 / "nl" / "merged" / "b")  # in both layers: counts once
    mkfile(l1 / "nl" / "merged" / "file")
    mkfile(l1 / "dev" / "f", "f")
    mkdir(l1 / "dev" / "d")
    os.symlink("f", l1 / "dev" / "lnk")
    os.mkfifo(l1 / "dev" / "fifo")
    mkfile(l1 / "ino" / "f", "f")
    mkdir(l1 / "ino" / "d")
    os.symlink("f", l1 / "ino" / "lnk")
    mkfile(l1 / "ino" / "h1", "h")
    os.link(l1 / "ino" / "h1", l1 / "ino" / "h2")
    mkfile(l0 / "ino" / "h3", "h3")
    os.link(l0 / "ino" / "h3", l0 / "ino" / "h4")


@pytest.fixture(scope="module", params=KINDS)
def u(request):
    with built_union(request.param, _build) as un:
        yield un


def test_names_longer_than_255_bytes(u: Union):
    d = u.p("long")
    assert (d / N255).read_text() == "255"
    assert N255 in os.listdir(d)
    assert errno_of(os.lstat, d / N256) == errno.ENAMETOOLONG
    assert errno_of(os.open, d / N256, os.O_WRONLY | os.O_CREAT, 0o644) == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, d / N256) == errno.ENAMETOOLONG
    assert errno_of(os.symlink, "x", d / N256) == errno.ENAMETOOLONG
    assert errno_of(os.link, d / "short", d / N256) == errno.ENAMETOOLONG
    assert errno_of(os.rename, d / "short", d / N256) == errno.ENAMETOOLONG
    assert errno_of(os.mknod, d / N256, stat.S_IFIFO | 0o644) == errno.ENAMETOOLONG
    m255 = "m" * 255
    os.mkdir(d / m255)
    (d / m255 / N255).write_text("new")
    os.rename(d / "short", d / ("r" * 255))
    os.unlink(d / N255)  # a lower name of 255 bytes still gets whited out
    assert sorted(os.listdir(d)) == [m255, "r" * 255]
    assert (d / m255 / N255).read_text() == "new"


def _deep_lower(top: Path) -> None:
    """DEPTH levels of SEG under top, a file at the bottom: longer than PATH_MAX from top."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(DEPTH):
            os.mkdir(SEG, dir_fd=fd)
            fd = _walk_down(fd, [SEG])
        with open(os.open("bottom", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as fh:
            fh.write("lower bottom")
    finally:
        os.close(fd)


def _walk_down(fd: int, names: list[str]) -> int:
    for n in names:
        nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


@pytest.mark.parametrize("kind", KINDS)
def test_lower_tree_deeper_than_path_max(shared_tmp, kind):
    """A lower layer whose paths exceed PATH_MAX: mountable, readable, copy-up works."""
    lowers, upper, work, mnt = layout(shared_tmp, 1)
    _deep_lower(lowers[0] / "deep")
    un = mount_union(kind, mnt, lowers, upper, work)
    fd = _walk_down(os.open(un.p("deep"), os.O_RDONLY | os.O_DIRECTORY), [SEG] * DEPTH)
    old = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fchdir(fd)  # relative to a cwd inside the mount
        assert open("bottom").read() == "lower bottom"
        with open("bottom", "a") as fh:  # copy-up of every parent, 5000 bytes down
            fh.write("!")
        assert open("bottom").read() == "lower bottom!"
        os.mkdir("more")
        with open("more/new", "w") as fh:
            fh.write("new")
        assert sorted(os.listdir(".")) == ["bottom", "more"]
        os.rename("more/new", "moved")
        os.unlink("moved")
        os.unlink("bottom")
        os.rmdir("more")
        assert os.listdir(".") == []
    finally:
        os.fchdir(old)
        os.close(old)
        os.close(fd)
        un.unmount()


def test_new_paths_deeper_than_path_max(u: Union):
    """A tree deeper than PATH_MAX created, renamed in and removed through the mount."""
    fd = os.open(u.p("deep"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(DEPTH):
            os.mkdir("n" + SEG, dir_fd=fd)
            nfd = os.open("n" + SEG, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "w") as fh:
            fh.write("leaf")
        assert os.stat("leaf", dir_fd=fd).st_size == 4
        os.rename("leaf", "leaf2", src_dir_fd=fd, dst_dir_fd=fd)
        os.symlink("leaf2", "sl", dir_fd=fd)
        assert sorted(os.listdir(fd)) == ["leaf2", "sl"]
        with open(os.open("sl", os.O_RDONLY, dir_fd=fd)) as fh:
            assert fh.read() == "leaf"
        os.unlink("sl", dir_fd=fd)
        os.unlink("leaf2", dir_fd=fd)
        for _ in range(DEPTH):  # remove the chain bottom-up
            os.close(fd)
            fd = os.open(f"{u.p('deep')}", os.O_RDONLY | os.O_DIRECTORY)
            fd = _walk_down(fd, ["n" + SEG] * (DEPTH - 1 - _))
            os.rmdir("n" + SEG, dir_fd=fd)
        assert os.listdir(u.p("deep")) == []
    finally:
        os.close(fd)


def test_open_unlinked_files_stay_usable_with_nlink_0(u: Union):
    d = u.p("unl")
    (d / "new").write_text("upper file")
    for name in ("rw", "new"):
        fd = os.open(d / name, os.O_RDWR)
        try:
            os.unlink(d / name)
            assert errno_of(os.lstat, d / name) == errno.ENOENT
            assert os.fstat(fd).st_nlink == 0, name
            os.pwrite(fd, b"XY", 0)
            assert os.pread(fd, 100, 0)[:2] == b"XY"
            os.ftruncate(fd, 1)
            assert os.fstat(fd).st_size == 1
        finally:
            os.close(fd)
        assert errno_of(os.lstat, d / name) == errno.ENOENT
    fd = os.open(d / "ro", os.O_RDONLY)
    try:
        os.unlink(d / "ro")
        assert os.pread(fd, 100, 0) == b"lower ro"
        if u.is_fusesnap:  # the kernel's fd points at the lower inode, still linked there
            assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert os.listdir(d) == []


def test_directory_nlink_is_two_plus_subdirs(u: Union):
    os.makedirs(u.p("nl", "pure", "x"))
    os.mkdir(u.p("nl", "pure", "y"))
    (u.p("nl", "pure", "f")).write_text("f")
    assert os.lstat(u.p("nl", "pure")).st_nlink == 4
    u.only_fusesnap("merged directories report st_nlink 1 on kernel overlayfs")
    m = u.p("nl", "merged")
    assert os.lstat(m).st_nlink == 2 + 3  # a, b, c
    os.mkdir(m / "d")
    assert os.lstat(m).st_nlink == 6
    os.rmdir(m / "a")
    os.rmdir(m / "b")
    assert os.lstat(m).st_nlink == 4


def test_every_object_reports_the_mounts_st_dev(u: Union):
    d = u.p("dev")
    (d / "upper").write_text("u")
    with open(d / "f", "a") as fh:
        fh.write("copied up")
    os.mkdir(d / "newdir")
    os.chmod(d / "fifo", 0o600)  # copy-up of a special file keeps its type
    assert stat.S_ISFIFO(os.lstat(d / "fifo").st_mode) and stat.S_IMODE(os.lstat(d / "fifo").st_mode) == 0o600
    dev = os.stat(u.mnt).st_dev
    assert dev != os.stat(u.upper).st_dev
    for n in ("", "f", "d", "lnk", "fifo", "upper", "newdir"):
        assert os.lstat(d / n).st_dev == dev, n


def test_inode_numbers_stable_across_copy_up_and_cache_drop(u: Union):
    d = u.p("ino")
    names = ["f", "d", "lnk", "h1", "h2", "h3", "h4", ""]
    before = {n: os.lstat(d / n).st_ino for n in names}
    assert len({before[n] for n in ("f", "d", "lnk", "h1", "h3", "")}) == 6, "distinct objects share an inode"
    assert before["h1"] == before["h2"] and before["h3"] == before["h4"]
    assert os.lstat(d / "h1").st_nlink == 2
    with open(d / "f", "a") as fh:
        fh.write("+")
    os.chmod(d / "d", 0o700)
    os.lchown(d / "lnk", 3, 3)
    with open(d / "h2", "a") as fh:
        fh.write("+")
    os.link(d / "h3", d / "h5")
    assert {n: os.lstat(d / n).st_ino for n in names} == before
    assert os.readlink(d / "lnk") == "f" and os.lstat(d / "lnk").st_uid == 3  # symlink copied up as one
    assert os.lstat(d / "h5").st_ino == before["h3"] and os.lstat(d / "h3").st_nlink == 3
    seen: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(u.mnt):
        for n in dirnames + filenames:
            seen.setdefault(os.lstat(os.path.join(dirpath, n)).st_ino, []).append(os.path.join(dirpath, n))
    for ino, paths in seen.items():  # an inode number shared by two names must be a hard link
        if len(paths) > 1:
            assert os.lstat(paths[0]).st_nlink >= len(paths), f"st_ino {ino} shared: {paths}"
    with open("/proc/sys/vm/drop_caches", "w") as f:  # forget every dentry/inode the kernel holds
        f.write("2")
    assert {n: os.lstat(d / n).st_ino for n in names} == before
    assert (d / "h1").read_text() == "h+"


def test_inode_numbers_unique_across_layers_on_different_filesystems(shared_tmp):
    """Lower and upper on two tmpfs instances: their host inode numbers collide, the mount's must not.

    fusesnap only: kernel overlayfs without xino reports the real st_dev/st_ino of non-directories
    when layers sit on different filesystems (Documentation/filesystems/overlayfs.rst).
    """
    a, b = shared_tmp / "fs-a", shared_tmp / "fs-b"
    for d in (a, b):
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(d)], check=True)
    try:
        lower, upper, work, mnt = a / "lower", b / "upper", b / "work", shared_tmp / "mnt"
        for i in range(20):
            mkfile(lower / f"low{i}", f"{i}")
        for d in (upper, work, mnt):
            d.mkdir()
        un = mount_union(FUSESNAP, mnt, [lower], upper, work)
        try:
            for i in range(20):
                (mnt / f"up{i}").write_text(str(i))
            host = {os.lstat(upper / f"up{i}").st_ino for i in range(20)}
            assert host & {os.lstat(lower / f"low{i}").st_ino for i in range(20)}, "no host collision to test"
            names = [f"low{i}" for i in range(20)] + [f"up{i}" for i in range(20)]
            st = {n: os.lstat(mnt / n) for n in names}
            assert len({s.st_ino for s in st.values()}) == len(names), "two objects share an inode number"
            assert {s.st_dev for s in st.values()} == {os.stat(mnt).st_dev}
            ino = st["low3"].st_ino
            with open(mnt / "low3", "a") as fh:  # copy-up to the other filesystem
                fh.write("+")
            assert os.lstat(mnt / "low3").st_ino == ino
        finally:
            un.unmount()
    finally:
        for d in (a, b):
            subprocess.run(["umount", str(d)], check=False)
