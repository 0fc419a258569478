"""Copy-up data path (fusesnap/fs/core/datacopy.py): identical content for every size, holes kept,
fallbacks when the kernel cannot copy, and the same through a real mount (worker-thread path
for files above BIG, hard-linked lower files copied once)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from fusesnap.fs.core import datacopy as copyup
from fusesnap.fs.core.datacopy import copy_data, data_extents
from fusesnap.fs.fuse.operations import BIG
from helpers import is_root
from unionmount import KINDS, Union, built_union, mkfile

HOLE = 4 << 20          # big enough that a filesystem cannot round it away into one block
T1 = 1_000_000_000_123_456_789


def _blob(n: int, seed: int = 0) -> bytes:
    return (bytes(range(seed % 251, 251)) + bytes(range(0, seed % 251)) + b"\x00\xff") * (n // 253) + b"z" * (n % 253)


def _sparse(path: Path, layout: list[tuple[int, bytes]], size: int) -> bytes:
    """A file of size bytes with data only at the given offsets; returns its full content."""
    with open(path, "wb") as f:
        for off, data in layout:
            f.seek(off)
            f.write(data)
        f.truncate(size)
    content = bytearray(size)
    for off, data in layout:
        content[off:off + len(data)] = data
    return bytes(content)


def _copy(src: Path, dst: Path, size: int | None = None) -> None:
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        copy_data(s, d, os.fstat(s).st_size if size is None else size)
    finally:
        os.close(s)
        os.close(d)


def _holes_supported(d: Path) -> bool:
    p = d / "probe"
    with open(p, "wb") as f:
        f.truncate(HOLE)
    try:
        return os.stat(p).st_blocks == 0
    finally:
        p.unlink()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.mark.parametrize("n", [0, 1, 4095, BIG - 1, BIG, BIG + 1, 3 * BIG + 17])
def test_every_size_is_copied_byte_exact(tmp: Path, n: int):
    data = _blob(n, n)
    (tmp / "src").write_bytes(data)
    _copy(tmp / "src", tmp / "dst")
    assert os.stat(tmp / "dst").st_size == n
    assert (tmp / "dst").read_bytes() == data


def test_only_the_requested_prefix_is_copied(tmp: Path):
    (tmp / "src").write_bytes(b"0123456789")
    _copy(tmp / "src", tmp / "dst", 4)
    assert (tmp / "dst").read_bytes() == b"0123"


def test_holes_stay_holes_and_content_is_identical(tmp: Path):
    if not _holes_supported(tmp):
        pytest.skip(f"{tmp} does not keep holes")
    # leading hole, two data runs split by a hole, trailing hole
    layout = [(HOLE, _blob(BIG + 5, 1)), (3 * HOLE, _blob(70_000, 2))]
    content = _sparse(tmp / "src", layout, 5 * HOLE + 123)
    _copy(tmp / "src", tmp / "dst")
    src, dst = os.stat(tmp / "src"), os.stat(tmp / "dst")
    assert dst.st_size == src.st_size
    assert (tmp / "dst").read_bytes() == content
    assert dst.st_blocks <= src.st_blocks + 64, (dst.st_blocks, src.st_blocks)
    with open(tmp / "src", "rb") as s, open(tmp / "dst", "rb") as d:
        assert list(data_extents(d.fileno(), dst.st_size)) == list(data_extents(s.fileno(), src.st_size))


def test_a_file_that_is_all_hole_stays_empty_on_disk(tmp: Path):
    if not _holes_supported(tmp):
        pytest.skip(f"{tmp} does not keep holes")
    _sparse(tmp / "src", [], 2 * HOLE)
    _copy(tmp / "src", tmp / "dst")
    st = os.stat(tmp / "dst")
    assert (st.st_size, st.st_blocks) == (2 * HOLE, 0)
    assert (tmp / "dst").read_bytes() == bytes(2 * HOLE)


def test_copy_across_filesystems(tmp: Path):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    src = shm / f"fusesnap-copyup-{os.getpid()}"
    data = _blob(BIG + 3, 7)
    src.write_bytes(data)
    try:
        _copy(src, tmp / "dst")
    finally:
        src.unlink()
    assert (tmp / "dst").read_bytes() == data


def test_read_write_fallback_when_no_in_kernel_copy_works(tmp: Path, monkeypatch):
    calls = []

    def refuse(src: int, dst: int, off: int, n: int) -> int:
        calls.append(off)
        raise OSError(errno.EINVAL, "not here")

    monkeypatch.setattr(copyup, "_STEPS", (refuse, refuse))
    layout = [(0, _blob(3 * BIG + 1, 3)), (3 * HOLE, b"tail")]
    content = _sparse(tmp / "src", layout, 3 * HOLE + 4)
    _copy(tmp / "src", tmp / "dst")
    assert calls, "the in-kernel copies were not tried first"
    assert (tmp / "dst").read_bytes() == content


def test_a_real_copy_error_is_raised(tmp: Path):
    (tmp / "src").write_bytes(b"data")
    s = os.open(tmp / "src", os.O_RDONLY)
    d = os.open(tmp / "dst", os.O_RDONLY | os.O_CREAT, 0o600)   # not writable
    try:
        with pytest.raises(OSError) as e:
            copy_data(s, d, 4)
        assert e.value.errno == errno.EBADF
    finally:
        os.close(s)
        os.close(d)


# ------------------------------------------------------------------ through a mount

XATTRS = {"user.k": b"v", "trusted.t": b"T"}
SPARSE_LAYOUT = [(HOLE, _blob(BIG + 9, 4))]
SPARSE_SIZE = 3 * HOLE


def _build(l0: Path, l1: Path) -> None:
    for name, n in (("empty", 0), ("one", 1), ("big", 2 * BIG + 11)):
        mkfile(l1 / "d" / name, _blob(n, n), 0o640, uid=1001, gid=1002, mtime_ns=T1, xattrs=XATTRS)
    _sparse(l1 / "d" / "sparse", SPARSE_LAYOUT, SPARSE_SIZE)
    os.chown(l1 / "d" / "sparse", 1003, 1004)
    os.chmod(l1 / "d" / "sparse", 0o604)
    os.utime(l1 / "d" / "sparse", ns=(T1, T1))
    mkfile(l1 / "hl" / "a", _blob(BIG + 100, 5), 0o644, uid=7, gid=8, mtime_ns=T1)
    os.link(l1 / "hl" / "a", l1 / "hl" / "b")


@pytest.fixture(scope="module", params=KINDS)
def u(request):
    if not is_root():
        pytest.skip("needs root to mount and to set owners")
    with built_union(request.param, _build) as un:
        yield un


def _ident(st: os.stat_result) -> tuple:
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


@pytest.mark.parametrize("name", ["empty", "one", "big"])
def test_append_copies_up_content_and_metadata(u: Union, name: str):
    lower = u.lowers[1] / "d" / name
    before = lower.read_bytes()
    with open(u.p("d", name), "ab") as f:
        f.write(b"+")
    assert u.p("d", name).read_bytes() == before + b"+"
    assert lower.read_bytes() == before
    st = os.lstat(u.p("d", name))
    assert _ident(st) == (0o640, 1001, 1002)
    assert {k: os.getxattr(u.p("d", name), k) for k in XATTRS} == XATTRS
    assert _ident(os.lstat(u.up("d", name))) == (0o640, 1001, 1002)
    assert u.up("d", name).read_bytes() == before + b"+"


def test_sparse_lower_file_stays_sparse_in_the_upper(u: Union):
    if not _holes_supported(u.upper):
        pytest.skip("the upper filesystem does not keep holes")
    lower = u.lowers[1] / "d" / "sparse"
    content = lower.read_bytes()
    with open(u.p("d", "sparse"), "r+b") as f:
        f.seek(SPARSE_SIZE - 1)
        f.write(b"!")
    want = content[:-1] + b"!"
    assert u.p("d", "sparse").read_bytes() == want
    assert _ident(os.lstat(u.p("d", "sparse"))) == (0o604, 1003, 1004)
    up = os.lstat(u.up("d", "sparse"))
    assert up.st_size == SPARSE_SIZE
    # the data run plus the last block (the kernel skips holes in 1 MiB steps): far below the
    # 12 MiB a dense copy takes
    assert up.st_blocks * 512 <= SPARSE_SIZE // 4, up.st_blocks


def test_big_hard_linked_lower_file_is_copied_once(u: Union):
    u.only_fusesnap("kernel overlayfs copies hard-link groups up lazily (index=on)")
    before = (u.lowers[1] / "hl" / "a").read_bytes()
    with open(u.p("hl", "b"), "ab") as f:
        f.write(b"+")
    for n in ("a", "b"):
        assert u.p("hl", n).read_bytes() == before + b"+", n
        assert _ident(os.lstat(u.p("hl", n))) == (0o644, 7, 8)
    ua, ub = os.lstat(u.up("hl", "a")), os.lstat(u.up("hl", "b"))
    assert ua.st_ino == ub.st_ino and ua.st_nlink == 2
