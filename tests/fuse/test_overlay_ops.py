"""Every operation a real rootfs needs, on lower files, upper files and
new files of one shared mount per kind: setattr variants, open/create flags, read/write, dirs,
rename flags, links, special files, xattrs, statfs, fsync, fallocate, lseek, access."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat
from pathlib import Path

import pytest

from helpers import is_root
from unionmount import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KINDS, RENAME_EXCHANGE, RENAME_NOREPLACE,
                        UTIME_NOW, UTIME_OMIT, Union, built_union, errno_of, fallocate, mkdir, mkfile,
                        renameat2, snapshot_tree, tree_diff, utimensat)

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root to mount")

T2001 = 978307200_123456789  # 2001-01-01, with nanoseconds
DATA = bytes(range(256)) * 64  # 16 KiB


def _build(l0: Path, l1: Path) -> None:
    mkfile(l1 / "setattr" / "f", DATA, 0o640, uid=1000, gid=1001, mtime_ns=T2001)
    mkfile(l1 / "setattr" / "g", DATA, 0o644, mtime_ns=T2001)
    mkfile(l1 / "setattr" / "h", DATA, 0o644, mtime_ns=T2001)
    mkfile(l1 / "setattr" / "t", DATA, 0o644, mtime_ns=T2001)
    mkfile(l1 / "open" / "trunc", DATA)
    mkfile(l1 / "open" / "append", b"head\n")
    mkfile(l1 / "open" / "excl", b"x")
    mkfile(l1 / "open" / "deleted", b"x")
    mkfile(l1 / "rw" / "f", DATA)
    mkfile(l1 / "rw" / "mapped", DATA)
    mkdir(l1 / "dirs" / "full")
    mkfile(l1 / "dirs" / "full" / "x")
    mkfile(l1 / "dirs" / "file")
    for n in ("a", "b", "c", "d", "e", "x"):
        mkfile(l1 / "rename" / n, f"lower-{n}")
    mkdir(l1 / "rename" / "dir")
    mkfile(l1 / "rename" / "dir" / "in", "in")
    os.makedirs(l0 / "links")
    os.symlink("../rw/f", l0 / "links" / "lowlink")
    mkfile(l1 / "links" / "target", "t")
    mkfile(l1 / "xattr" / "f", "x", xattrs={"user.lower": b"L", "trusted.lower": b"T"})
    mkdir(l1 / "xattr" / "d", xattrs={"user.dirattr": b"D"})
    mkfile(l1 / "sync" / "f", "s")
    mkfile(l1 / "access" / "ro", "r", 0o444)
    mkfile(l1 / "access" / "x", "x", 0o755)
    mkfile(l1 / "access" / "none", "n", 0o000)
    mkdir(l1 / "special")


@pytest.fixture(scope="module", params=KINDS)
def u(request):
    with built_union(request.param, _build) as un:
        yield un


# ------------------------------------------------------------------ setattr


def test_chmod_and_chown(u: Union):
    f = u.p("setattr", "f")
    os.chmod(f, 0o4751)
    st = os.lstat(f)
    assert stat.S_IMODE(st.st_mode) == 0o4751 and (st.st_uid, st.st_gid) == (1000, 1001)
    os.chown(f, 2000, 2001)
    st = os.lstat(f)
    assert (st.st_uid, st.st_gid) == (2000, 2001)
    os.chown(f, -1, 3001)
    assert (os.lstat(f).st_uid, os.lstat(f).st_gid) == (2000, 3001)
    assert f.read_bytes() == DATA
    assert os.lstat(f).st_mtime_ns == T2001, "metadata change must not touch mtime"
    os.lchown(u.p("setattr"), 5, 6)
    assert os.lstat(u.p("setattr")).st_uid == 5


def test_truncate_shrink_and_extend(u: Union):
    g = u.p("setattr", "g")
    os.truncate(g, 100)
    assert g.read_bytes() == DATA[:100]
    with open(g, "r+b") as fh:
        os.ftruncate(fh.fileno(), 5000)
        assert os.fstat(fh.fileno()).st_size == 5000
    assert g.read_bytes() == DATA[:100] + bytes(4900)
    os.truncate(g, 0)
    assert os.lstat(g).st_size == 0


def test_utimens_exact_now_and_omit(u: Union):
    h = u.p("setattr", "h")
    os.utime(h, ns=(1_000_000_001, 2_000_000_002))
    st = os.lstat(h)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    utimensat(h, (0, UTIME_OMIT), (0, UTIME_NOW))
    st = os.lstat(h)
    assert st.st_atime_ns == 1_000_000_001, "UTIME_OMIT changed atime"
    assert st.st_mtime_ns > T2001, "UTIME_NOW did not set mtime"
    utimensat(h, (7, 8), (0, UTIME_OMIT))
    st2 = os.lstat(h)
    assert st2.st_atime_ns == 7_000_000_008 and st2.st_mtime_ns == st.st_mtime_ns
    os.utime(u.p("setattr"), ns=(T2001, T2001))
    assert os.lstat(u.p("setattr")).st_mtime_ns == T2001
    os.symlink("nowhere", u.p("setattr", "sl"))
    os.utime(u.p("setattr", "sl"), ns=(T2001, T2001), follow_symlinks=False)
    assert os.lstat(u.p("setattr", "sl")).st_mtime_ns == T2001


def test_write_updates_mtime_and_size(u: Union):
    t = u.p("setattr", "t")
    with open(t, "ab") as fh:
        fh.write(b"more")
    st = os.lstat(t)
    assert st.st_size == len(DATA) + 4 and st.st_mtime_ns > T2001


# ------------------------------------------------------------------ open / create


def test_open_flags(u: Union):
    d = u.p("open")
    fd = os.open(d / "trunc", os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.lstat(d / "trunc").st_size == 0
    assert (u.lowers[1] / "open" / "trunc").read_bytes() == DATA, "lower changed"

    fd = os.open(d / "append", os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"tail\n")
    os.close(fd)
    assert (d / "append").read_bytes() == b"head\ntail\n"

    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    assert errno_of(os.open, d / "excl", flags) == errno.EEXIST  # exists below
    os.close(os.open(d / "fresh", flags, 0o600))
    assert errno_of(os.open, d / "fresh", flags) == errno.EEXIST  # exists in upper
    os.unlink(d / "deleted")
    fd = os.open(d / "deleted", flags, 0o600)  # over a whiteout
    os.write(fd, b"new")
    os.close(fd)
    assert (d / "deleted").read_bytes() == b"new"

    old = os.umask(0o027)
    try:
        os.close(os.open(d / "masked", os.O_WRONLY | os.O_CREAT, 0o666))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(d / "masked").st_mode) == 0o640
    fd = os.open(d / "excl", os.O_WRONLY | os.O_CREAT, 0o600)  # existing lower file: opened, kept
    os.close(fd)
    assert (d / "excl").read_bytes() == b"x"
    os.symlink("excl", d / "to-excl")
    os.symlink("made-through-link", d / "dangling")
    assert errno_of(os.open, d / "to-excl", os.O_RDONLY | os.O_NOFOLLOW) == errno.ELOOP
    assert errno_of(os.open, d / "dangling", flags) == errno.EEXIST  # O_EXCL does not follow
    os.close(os.open(d / "dangling", os.O_WRONLY | os.O_CREAT, 0o644))  # creates the target
    assert os.path.isfile(d / "made-through-link")
    assert errno_of(os.open, d / "absent", os.O_RDONLY) == errno.ENOENT
    assert errno_of(os.open, d / "excl" / "x", os.O_RDONLY) == errno.ENOTDIR
    assert errno_of(os.open, d, os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.open, d / "excl", os.O_RDONLY | os.O_DIRECTORY) == errno.ENOTDIR


def test_read_write_at_offsets_and_across_handles(u: Union):
    f = u.p("rw", "f")
    fd = os.open(f, os.O_RDWR)
    try:
        assert os.pread(fd, 10, 256) == DATA[256:266]
        os.pwrite(fd, b"XYZ", 1000)
        os.pwrite(fd, b"end", len(DATA) + 4096)  # leaves a hole
        other = os.open(f, os.O_RDONLY)
        try:
            assert os.pread(other, 3, 1000) == b"XYZ"
        finally:
            os.close(other)
    finally:
        os.close(fd)
    got = f.read_bytes()
    assert got[:1000] == DATA[:1000] and got[1000:1003] == b"XYZ"
    assert got[len(DATA):len(DATA) + 4096] == bytes(4096) and got.endswith(b"end")
    big = os.urandom(1 << 20)
    u.p("rw", "big").write_bytes(big)
    assert hashlib.sha256(u.p("rw", "big").read_bytes()).digest() == hashlib.sha256(big).digest()
    src, dst = os.open(u.p("rw", "big"), os.O_RDONLY), os.open(u.p("rw", "copy"), os.O_WRONLY | os.O_CREAT)
    try:
        done = 0
        while done < len(big):
            n = os.copy_file_range(src, dst, len(big) - done)
            assert n > 0
            done += n
    finally:
        os.close(src)
        os.close(dst)
    assert u.p("rw", "copy").read_bytes() == big


def test_shared_mmap_of_a_lower_file(u: Union):
    import mmap
    f = u.p("rw", "mapped")
    fd = os.open(f, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
            assert mm[:4] == DATA[:4]
            mm[:4] = b"MMAP"
            mm.flush()
    finally:
        os.close(fd)
    assert f.read_bytes()[:6] == b"MMAP" + DATA[4:6]
    assert (u.lowers[1] / "rw" / "mapped").read_bytes() == DATA


# ------------------------------------------------------------------ directories


def test_mkdir_rmdir_unlink_errors(u: Union):
    d = u.p("dirs")
    os.mkdir(d / "new", 0o700)
    assert stat.S_IMODE(os.lstat(d / "new").st_mode) == 0o700
    assert errno_of(os.mkdir, d / "new") == errno.EEXIST
    assert errno_of(os.mkdir, d / "full") == errno.EEXIST
    assert errno_of(os.rmdir, d / "full") == errno.ENOTEMPTY
    assert errno_of(os.rmdir, d / "file") == errno.ENOTDIR
    assert errno_of(os.unlink, d / "full") in (errno.EISDIR, errno.EPERM)
    assert errno_of(os.unlink, d / "absent") == errno.ENOENT
    assert errno_of(os.mkdir, d / "absent" / "x") == errno.ENOENT
    os.rmdir(d / "new")
    os.unlink(d / "full" / "x")
    os.rmdir(d / "full")
    assert sorted(os.listdir(d)) == ["file"]


# ------------------------------------------------------------------ rename


def test_rename_files_and_flags(u: Union):
    d = u.p("rename")
    os.rename(d / "a", d / "b")  # lower over lower
    assert (d / "b").read_text() == "lower-a" and not os.path.lexists(d / "a")
    assert errno_of(renameat2, d / "c", d / "b", RENAME_NOREPLACE) == errno.EEXIST
    assert (d / "c").read_text() == "lower-c"
    renameat2(d / "c", d / "c2", RENAME_NOREPLACE)
    assert (d / "c2").read_text() == "lower-c" and not os.path.lexists(d / "c")
    (d / "up").write_text("upper")
    renameat2(d / "d", d / "up", RENAME_EXCHANGE)  # lower <-> upper
    assert (d / "d").read_text() == "upper" and (d / "up").read_text() == "lower-d"
    renameat2(d / "e", d / "dir", RENAME_EXCHANGE)  # file <-> lower dir
    assert (d / "e").is_dir() and os.listdir(d / "e") == ["in"] and (d / "dir").read_text() == "lower-e"
    assert errno_of(renameat2, d / "x", d / "missing", RENAME_EXCHANGE) == errno.ENOENT
    assert errno_of(os.rename, d / "x", d / "e") == errno.EISDIR
    assert errno_of(os.rename, d / "e", d / "x") == errno.ENOTDIR
    assert errno_of(os.rename, d / "e", d / "e" / "in2") == errno.EINVAL
    os.mkdir(d / "ud")
    assert errno_of(os.rename, d / "ud", d / "e") == errno.ENOTEMPTY  # over a non-empty lower dir
    os.rmdir(d / "ud")
    os.rename(d / "x", d / "x")  # same name: a no-op
    assert (d / "x").read_text() == "lower-x"
    assert sorted(os.listdir(d)) == ["b", "c2", "d", "dir", "e", "up", "x"]


# ------------------------------------------------------------------ links


def test_symlink_and_readlink(u: Union):
    d = u.p("links")
    assert os.readlink(d / "lowlink") == "../rw/f"
    assert stat.S_ISLNK(os.lstat(d / "lowlink").st_mode)
    long_target = "t" * 1000 + "/x"
    os.symlink(long_target, d / "long")
    assert os.readlink(d / "long") == long_target
    os.symlink("target", d / "rel")
    assert (d / "rel").read_text() == "t"
    assert os.lstat(d / "rel").st_size == len("target")
    assert errno_of(os.readlink, d / "target") == errno.EINVAL
    assert errno_of(os.symlink, "x", d / "target") == errno.EEXIST


def test_hard_links(u: Union):
    d = u.p("links")
    os.link(d / "target", d / "second")  # link to a lower file
    a, b = os.lstat(d / "target"), os.lstat(d / "second")
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    with open(d / "second", "a") as fh:
        fh.write("+")
    assert (d / "target").read_text() == "t+"
    (d / "up").write_text("u")
    os.link(d / "up", d / "up2")
    assert os.lstat(d / "up").st_ino == os.lstat(d / "up2").st_ino
    os.unlink(d / "up")
    assert os.lstat(d / "up2").st_nlink == 1 and (d / "up2").read_text() == "u"
    assert errno_of(os.link, d / "up2", d / "target") == errno.EEXIST
    assert errno_of(os.link, u.p("rename"), d / "dirlink") == errno.EPERM


# ------------------------------------------------------------------ special files


def test_mknod_fifo_socket_and_devices(u: Union):
    d = u.p("special")
    os.mkfifo(d / "fifo", 0o640)
    os.mknod(d / "sockn", stat.S_IFSOCK | 0o600)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(d / "sock"))
    finally:
        s.close()
    os.mknod(d / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(d / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 1))
    st = {n: os.lstat(d / n) for n in os.listdir(d)}
    assert stat.S_ISFIFO(st["fifo"].st_mode) and stat.S_IMODE(st["fifo"].st_mode) == 0o640
    assert stat.S_ISSOCK(st["sockn"].st_mode) and stat.S_ISSOCK(st["sock"].st_mode)
    assert stat.S_ISCHR(st["null"].st_mode) and st["null"].st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(st["loop"].st_mode) and st["loop"].st_rdev == os.makedev(7, 1)
    assert errno_of(os.mkfifo, d / "fifo") == errno.EEXIST


# ------------------------------------------------------------------ xattrs


def test_xattrs_get_set_list_remove(u: Union):
    f, dd = u.p("xattr", "f"), u.p("xattr", "d")
    assert os.getxattr(f, "user.lower") == b"L"
    assert os.getxattr(f, "trusted.lower") == b"T"
    assert os.getxattr(dd, "user.dirattr") == b"D"
    os.setxattr(f, "user.new", b"\x00binary\xff")
    os.setxattr(f, "trusted.new", b"t")
    os.setxattr(f, "security.fusesnaptest", b"s")
    os.setxattr(dd, "user.dir2", b"2")
    assert os.getxattr(f, "user.new") == b"\x00binary\xff"
    assert os.getxattr(f, "security.fusesnaptest") == b"s"
    names = set(os.listxattr(f))
    assert {"user.lower", "trusted.lower", "user.new", "trusted.new", "security.fusesnaptest"} <= names
    assert not [n for n in names if n.startswith(("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs."))]
    assert {"user.dirattr", "user.dir2"} <= set(os.listxattr(dd))
    assert errno_of(os.setxattr, f, "user.new", b"x", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, f, "user.absent", b"x", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(f, "user.new", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.new") == b"replaced"
    os.removexattr(f, "user.lower")
    assert errno_of(os.getxattr, f, "user.lower") == errno.ENODATA
    assert errno_of(os.removexattr, f, "user.lower") == errno.ENODATA
    assert "user.lower" not in os.listxattr(f)
    assert os.getxattr(u.lowers[1] / "xattr" / "f", "user.lower") == b"L", "lower changed"
    os.setxattr(f, "user.big", b"v" * 1500)
    assert os.getxattr(f, "user.big") == b"v" * 1500


# ------------------------------------------------------------------ statfs, sync, allocation, seek


def test_statfs_describes_the_upper_filesystem(u: Union):
    sv, up = os.statvfs(u.mnt), os.statvfs(u.upper)
    assert sv.f_namemax == 255
    assert 0 < sv.f_bavail <= sv.f_bfree <= sv.f_blocks
    total, up_total = sv.f_blocks * sv.f_frsize, up.f_blocks * up.f_frsize
    assert abs(total - up_total) <= up_total // 50, (total, up_total)
    assert sv.f_bsize > 0 and sv.f_frsize > 0


def test_fsync_fdatasync_fsyncdir(u: Union):
    f = u.p("sync", "f")
    fd = os.open(f, os.O_RDWR | os.O_APPEND)
    try:
        os.write(fd, b"!")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(u.p("sync"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert (u.up("sync", "f")).read_bytes() == b"s!"  # data reached the upper after fsync


def test_fallocate(u: Union):
    f = u.p("sync", "alloc")
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"abc")
        os.posix_fallocate(fd, 0, 65536)
        assert os.fstat(fd).st_size == 65536
        assert os.pread(fd, 10, 0) == b"abc" + bytes(7)
    finally:
        os.close(fd)


def test_native_fallocate(u: Union):
    """fallocate(2) itself (no glibc emulation): allocate, keep-size preallocation, punch a hole."""
    f = u.p("sync", "native-alloc")
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fallocate(fd, 0, 0, 1 << 20)
        assert os.fstat(fd).st_size == 1 << 20
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20)
        st = os.fstat(fd)
        assert st.st_size == 1 << 20 and st.st_blocks * 512 >= 2 << 20
        os.pwrite(fd, b"x" * 8192, 0)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096)
        assert os.pread(fd, 4097, 0) == bytes(4096) + b"x"
    finally:
        os.close(fd)


def test_seek_hole_reports_the_hosts_holes(u: Union):
    f = u.p("sync", "sparse2")
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"d" * 4096, 0)
        os.pwrite(fd, b"e" * 4096, 1 << 20)
        os.fsync(fd)
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 4096
        assert os.lseek(fd, 4096, os.SEEK_DATA) == 1 << 20
    finally:
        os.close(fd)


def test_lseek_data_and_hole(u: Union):
    f = u.p("sync", "sparse")
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"d" * 4096, 0)
        os.pwrite(fd, b"e" * 4096, 1 << 20)
        size = os.fstat(fd).st_size
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        assert 4096 <= hole <= size
        if hole < size:  # the host reports holes: the next data is the second extent
            assert hole < os.lseek(fd, hole, os.SEEK_DATA) <= 1 << 20
        assert errno_of(os.lseek, fd, size, os.SEEK_DATA) == errno.ENXIO
        assert os.lseek(fd, -10, os.SEEK_END) == size - 10
    finally:
        os.close(fd)


def test_access_as_root(u: Union):
    d = u.p("access")
    assert os.access(d / "ro", os.R_OK) and os.access(d / "ro", os.W_OK)  # root ignores mode bits...
    assert not os.access(d / "ro", os.X_OK)  # ...except that x needs some x bit
    assert os.access(d / "x", os.X_OK)
    assert os.access(d / "none", os.R_OK | os.W_OK)
    assert os.access(d, os.X_OK | os.W_OK)
    assert not os.access(d / "absent", os.F_OK)


def test_parallel_workers(u: Union):
    """Four threads create/write/read/rename/unlink in their own dirs while a fifth lists them."""
    import threading

    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(k: int) -> None:
        try:
            d = u.p("par", f"w{k}")
            d.mkdir(parents=True)
            for i in range(60):
                f = d / f"f{i}"
                f.write_bytes(bytes([i]) * (i * 100))
                assert f.read_bytes() == bytes([i]) * (i * 100)
                if i % 3 == 0:
                    os.rename(f, d / f"r{i}")
                elif i % 3 == 1:
                    os.unlink(f)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def lister() -> None:
        try:
            while not stop.is_set():
                for k in range(4):
                    if u.p("par", f"w{k}").exists():
                        os.listdir(u.p("par", f"w{k}"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    lt = threading.Thread(target=lister)
    lt.start()
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    stop.set()
    lt.join(30)
    assert not errors, errors[:3]
    for k in range(4):
        want = sorted([f"r{i}" for i in range(0, 60, 3)] + [f"f{i}" for i in range(2, 60, 3)])
        assert sorted(os.listdir(u.p("par", f"w{k}"))) == want


def test_every_change_survives_a_remount(u: Union):
    """Last in this module: what the mount showed is what it stored."""
    before = snapshot_tree(u.mnt)
    u.remount()
    assert not tree_diff(before, snapshot_tree(u.mnt))
