"""fallocate(2) modes and lseek(SEEK_DATA/SEEK_HOLE) reach the host file.

They need the patched pyfuse3 that scripts/setup installs (third_party/pyfuse3). Every
behaviour test runs on kernel overlayfs too (the reference that proves the test right) and on
fusesnap-overlay; one shared mount per kind. The hole checks need a host file system that
keeps holes (ext4/xfs/btrfs/tmpfs do); a probe skips them elsewhere.
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import pytest

from helpers import is_mounted, is_root, run_as
from unionmount import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KINDS, Union, errno_of, fallocate, layout,
                        mkfile, mount_union, overlay_cmd, overlay_opts, scratch)

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root to mount")

FALLOC_FL_ZERO_RANGE = 0x10
MiB = 1 << 20
BLK = 4096
X3 = b"x" * (3 * BLK)


def _host_keeps_holes(d: Path) -> bool:
    p = d / "probe"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"d" * BLK, 0)
        os.pwrite(fd, b"e" * BLK, MiB)
        os.fsync(fd)
        return os.lseek(fd, 0, os.SEEK_HOLE) == BLK
    finally:
        os.close(fd)
        p.unlink()


def _host_zero_range(d: Path) -> bool:
    p = d / "probe"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, X3, 0)
        return errno_of(fallocate, fd, FALLOC_FL_ZERO_RANGE, BLK, BLK) == 0
    finally:
        os.close(fd)
        p.unlink()


def _sparse(path: Path) -> None:
    """Data in [0, 4K) and [1M, 1M+4K), a hole between."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"a" * BLK)
        f.seek(MiB)
        f.write(b"b" * BLK)
        os.fsync(f.fileno())


@pytest.fixture(scope="module", params=KINDS)
def u(request):
    with scratch("fusesnap-space-") as base:
        lowers, upper, work, mnt = layout(base, 1)
        _sparse(lowers[0] / "low" / "sparse")
        mkfile(lowers[0] / "low" / "data", X3)
        mkfile(lowers[0] / "low" / "ro", X3)
        un = mount_union(request.param, mnt, lowers, upper, work)
        un.holes = _host_keeps_holes(upper)
        un.zero_range = _host_zero_range(upper)
        yield un
        un.unmount()


def _need_holes(u: Union) -> None:
    if not u.holes:
        pytest.skip("the host file system under /var/tmp does not keep holes")


def _open_new(u: Union, name: str, data: bytes = b"") -> int:
    fd = os.open(u.p(name), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    if data:
        os.pwrite(fd, data, 0)
    return fd


def test_patched_pyfuse3_is_installed_and_defaults_to_enosys():
    """setup installed the patched build; file systems that do not override the new
    methods keep stock behaviour (ENOSYS, so the kernel falls back)."""
    import pyfuse3
    import trio
    assert "+fusesnap" in importlib.metadata.version("pyfuse3")   # any local_tag of build.sh
    ops = pyfuse3.Operations()
    for call in (lambda: ops.fallocate(3, 0, 0, 1), lambda: ops.lseek(3, 0, os.SEEK_DATA)):
        with pytest.raises(pyfuse3.FUSEError) as ei:
            trio.run(call)
        assert ei.value.errno == errno.ENOSYS


def test_allocate_extends_the_file_and_stat_by_name_sees_it(u: Union):
    p = u.p("alloc")
    fd = _open_new(u, "alloc", b"abc")
    try:
        assert os.stat(p).st_size == 3          # the kernel now caches this size
        fallocate(fd, 0, 0, MiB)
        st = os.stat(p)
        assert st.st_size == MiB and st.st_blocks * 512 >= MiB
        assert os.pread(fd, 8, 0) == b"abc" + bytes(5)
        assert os.pread(fd, 8, MiB - 4) == bytes(4)
    finally:
        os.close(fd)
    assert os.stat(u.up("alloc")).st_size == MiB


def test_keep_size_preallocates_beyond_eof(u: Union):
    p = u.p("keep")
    fd = _open_new(u, "keep", b"k" * BLK)
    try:
        before = os.stat(p).st_blocks
        fallocate(fd, FALLOC_FL_KEEP_SIZE, BLK, MiB)
        st = os.stat(p)
        assert st.st_size == BLK
        assert st.st_blocks * 512 >= before * 512 + MiB
        assert os.read(fd, 2 * BLK) == b"k" * BLK        # nothing readable past EOF
    finally:
        os.close(fd)
    host = os.stat(u.up("keep"))
    assert host.st_size == BLK and host.st_blocks == st.st_blocks


def test_punch_hole_keep_size_drops_cached_pages_and_leaves_a_host_hole(u: Union):
    p = u.p("punch")
    fd = _open_new(u, "punch", X3)
    try:
        os.fsync(fd)
        assert os.pread(fd, len(X3), 0) == X3            # pages now in the page cache
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, BLK, BLK)
        assert os.pread(fd, len(X3), 0) == b"x" * BLK + bytes(BLK) + b"x" * BLK
        assert os.stat(p).st_size == len(X3)
        # without KEEP_SIZE the VFS refuses a punch, on every file system
        assert errno_of(fallocate, fd, FALLOC_FL_PUNCH_HOLE, 0, BLK) == errno.EOPNOTSUPP
        if u.holes:
            assert os.lseek(fd, 0, os.SEEK_HOLE) == BLK
            assert os.lseek(fd, BLK, os.SEEK_DATA) == 2 * BLK
    finally:
        os.close(fd)
    with open(u.up("punch"), "rb") as f:
        assert f.read() == b"x" * BLK + bytes(BLK) + b"x" * BLK
        if u.holes:
            assert os.lseek(f.fileno(), 0, os.SEEK_HOLE) == BLK


def test_zero_range_zeroes_inside_and_extends_unless_keep_size(u: Union):
    p = u.p("zero")
    fd = _open_new(u, "zero", X3)
    try:
        assert os.pread(fd, len(X3), 0) == X3
        if not u.zero_range:
            pytest.skip("the host file system under /var/tmp has no FALLOC_FL_ZERO_RANGE")
        if errno_of(fallocate, fd, FALLOC_FL_ZERO_RANGE, BLK, BLK) == errno.EOPNOTSUPP and u.is_fusesnap:
            # kernels before FUSE learned ZERO_RANGE refuse it themselves; other modes must work
            fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, BLK)
            pytest.skip("this kernel's FUSE does not forward FALLOC_FL_ZERO_RANGE")
        assert os.pread(fd, len(X3), 0) == b"x" * BLK + bytes(BLK) + b"x" * BLK
        assert os.stat(p).st_size == len(X3)
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 3 * BLK, BLK)
        assert os.stat(p).st_size == len(X3)
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 3 * BLK, BLK)
        assert os.stat(p).st_size == 4 * BLK
        assert os.pread(fd, 2 * BLK, 2 * BLK) == b"x" * BLK + bytes(BLK)
    finally:
        os.close(fd)
    assert os.stat(u.up("zero")).st_size == 4 * BLK


def test_seek_data_in_a_hole_at_eof_is_enxio(u: Union):
    _need_holes(u)
    fd = _open_new(u, "tail", b"t" * BLK)
    try:
        os.ftruncate(fd, MiB)                            # a hole from 4K to EOF
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 0, os.SEEK_HOLE) == BLK
        assert os.lseek(fd, 2 * BLK, os.SEEK_HOLE) == 2 * BLK
        assert errno_of(os.lseek, fd, 2 * BLK, os.SEEK_DATA) == errno.ENXIO
        assert errno_of(os.lseek, fd, MiB, os.SEEK_HOLE) == errno.ENXIO   # at EOF
        assert errno_of(os.lseek, fd, MiB + 1, os.SEEK_DATA) == errno.ENXIO
        # the answer moved the file position like any lseek
        assert os.lseek(fd, BLK, os.SEEK_HOLE) == BLK and os.lseek(fd, 0, os.SEEK_CUR) == BLK
    finally:
        os.close(fd)


def test_seek_on_a_lower_file_before_copy_up(u: Union):
    _need_holes(u)
    fd = os.open(u.p("low", "sparse"), os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == BLK
        assert os.lseek(fd, BLK, os.SEEK_DATA) == MiB
        assert os.lseek(fd, MiB, os.SEEK_HOLE) == MiB + BLK
        assert errno_of(os.lseek, fd, MiB + BLK, os.SEEK_DATA) == errno.ENXIO
        assert os.pread(fd, 2, MiB - 1) == b"\0b"
    finally:
        os.close(fd)
    assert not os.path.lexists(u.up("low", "sparse"))     # reading copied nothing up


def test_fallocate_on_a_lower_file_opened_for_writing_works_on_the_copy(u: Union):
    low = u.lowers[0] / "low" / "data"
    fd = os.open(u.p("low", "data"), os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, BLK)
        fallocate(fd, 0, 0, 4 * BLK)
        assert os.pread(fd, 4 * BLK, 0) == bytes(BLK) + b"x" * (2 * BLK) + bytes(BLK)
    finally:
        os.close(fd)
    assert u.up("low", "data").read_bytes() == bytes(BLK) + b"x" * (2 * BLK) + bytes(BLK)
    assert low.read_bytes() == X3                          # the lower is never written


def test_fallocate_on_a_read_only_descriptor_is_ebadf(u: Union):
    fd = os.open(u.p("low", "ro"), os.O_RDONLY)
    try:
        assert errno_of(fallocate, fd, 0, 0, MiB) == errno.EBADF
    finally:
        os.close(fd)
    assert os.stat(u.p("low", "ro")).st_size == len(X3)
    assert not os.path.lexists(u.up("low", "ro"))


ROOTLESS_PROBE = r'''
import ctypes, errno, json, os, subprocess, sys
cmd, opts, mnt = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)
def falloc(fd, mode, off, n):
    if libc.fallocate(fd, mode, ctypes.c_long(off), ctypes.c_long(n)) != 0:
        return errno.errorcode[ctypes.get_errno()]
    return "ok"
r = subprocess.run(cmd + ["-o", opts, mnt], capture_output=True, text=True, timeout=60)
R = {"rc": r.returncode, "stderr": r.stderr}
if r.returncode == 0:
    try:
        fd = os.open(os.path.join(mnt, "f"), os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(fd, b"y" * 12288, 0)
        os.fsync(fd)
        R["punch"] = falloc(fd, 3, 4096, 4096)
        R["data"] = os.pread(fd, 3, 4095).hex()
        R["hole"] = os.lseek(fd, 0, os.SEEK_HOLE)
        R["alloc"] = falloc(fd, 0, 0, 1 << 20)
        R["size"] = os.fstat(fd).st_size
        os.close(fd)
    finally:
        R["umount"] = subprocess.run(["fusermount3", "-u", mnt]).returncode
print(json.dumps(R))
'''


@pytest.mark.rootless
def test_rootless_mount_passes_fallocate_and_seek_hole(test_user):
    """The same passthrough in a mount an unprivileged user made through fusermount3."""
    with scratch("fusesnap-space-rl-") as base:
        lowers, upper, work, mnt = layout(base, 1)
        for d in (*lowers, upper, work, mnt):
            os.chown(d, test_user.pw_uid, test_user.pw_gid)
        holes = _host_keeps_holes(upper)
        r = run_as(test_user, [sys.executable, "-c", ROOTLESS_PROBE, json.dumps(overlay_cmd()),
                               overlay_opts(lowers, upper, work, []), str(mnt)], text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        rep = json.loads(r.stdout)
        assert rep["rc"] == 0, rep["stderr"]
        assert (rep["punch"], rep["alloc"], rep["size"], rep["data"]) == ("ok", "ok", MiB, "790000")
        if holes:
            assert rep["hole"] == BLK
        assert rep["umount"] == 0 and not is_mounted(mnt)
        assert os.stat(upper / "f").st_size == MiB
