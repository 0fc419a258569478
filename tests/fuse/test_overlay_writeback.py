"""-o writeback=1: the kernel's writeback cache (fuse-overlayfs's default; off by default in
fusesnap, docs/BENCHMARKS.md "Untar"). The kernel then merges small writes into few big WRITEs
and owns mtime, size and dirty pages the host file does not have yet. None of that may show:
data is in the upper after close(), SEEK_DATA/SEEK_HOLE see data still in the kernel, st_blocks
follows fallocate, mtimes stay across a remount, a lower file written in part is copied up whole,
and an unlinked file keeps taking writes through its fd. (The differential run covers the
mode too: tests/test_differential.py, profile fusesnap-writeback.)"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Iterator

import pytest

from fusesnap.fs.options import parse_options
from helpers import is_root, run_as
from test_fs_kernel_caching import count_requests
from unionmount import (FALLOC_FL_KEEP_SIZE, FUSESNAP, Union, chown_tree, fallocate, layout, mkfile,
                        mount_union, scratch)

needs_root = pytest.mark.skipif(not is_root(), reason="needs root to mount")

LOWER = bytes(range(256)) * 64          # 16 KiB: four pages
T_LOWER = 1_500_000_000_000_000_000
T_SET = 1_234_567_890_123_456_789
GAP = 1 << 20


def test_writeback_option_follows_fuse_overlayfs_spelling():
    base = "lowerdir=/l,upperdir=/u,workdir=/w"
    assert not parse_options([base]).writeback                 # off unless asked for
    assert parse_options([base + ",writeback=1"]).writeback
    assert parse_options([base + ",writeback"]).writeback
    assert not parse_options([base + ",writeback=1", "writeback=0"]).writeback


@contextlib.contextmanager
def _union(option: str) -> Iterator[Union]:
    """A fusesnap-overlay mount over one lower holding lower.bin."""
    with scratch("fusesnap-wb-") as base:
        (l0,), upper, work, mnt = layout(base, 1)
        mkfile(l0 / "lower.bin", LOWER, mtime_ns=T_LOWER)
        mkfile(l0 / "pair-a", LOWER)
        os.link(l0 / "pair-a", l0 / "pair-b")
        mkfile(l0 / "tree" / "f", LOWER)
        u = mount_union(FUSESNAP, mnt, [l0], upper, work, [option])
        try:
            yield u
        finally:
            u.unmount()


@pytest.fixture(params=["writeback=1", "writeback=0"])
def mount(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """_union() whose daemon logs its requests."""
    requests = count_requests(tmp_path, monkeypatch)
    with _union(request.param) as u:
        yield u, requests, request.param == "writeback=1"


@pytest.fixture(params=["writeback=1", "writeback=0"])
def fast_mount(request: pytest.FixtureRequest):
    """_union() served at full speed: a daemon slowed by logging lets the kernel's
    writeback races go by unseen."""
    with _union(request.param) as u:
        yield u, None, request.param == "writeback=1"


@needs_root
def test_small_writes_reach_the_daemon_merged(mount):
    u, requests, writeback = mount
    fd = os.open(u.p("new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for _ in range(64):
            os.write(fd, b"x" * 100)
    finally:
        os.close(fd)
    assert u.up("new").read_bytes() == b"x" * 6400      # on the host once close() returned
    writes = requests()["write"]
    if writeback:
        assert 1 <= writes <= 2, f"{writes} WRITE requests for 64 small writes"
    else:
        assert writes >= 64          # one per write(2), two where it crosses into a new page


@needs_root
def test_seek_data_and_hole_see_data_still_in_the_kernel(mount):
    u, _, _ = mount
    with open(u.p("sparse"), "w+b") as f:
        os.pwrite(f.fileno(), b"d" * 4096, GAP)
        assert os.lseek(f.fileno(), 0, os.SEEK_DATA) == GAP
        assert os.lseek(f.fileno(), GAP, os.SEEK_HOLE) == GAP + 4096
        with pytest.raises(OSError):
            os.lseek(f.fileno(), GAP + 4096, os.SEEK_DATA)     # ENXIO: past the data
        assert os.pread(f.fileno(), 4096, GAP) == b"d" * 4096


@needs_root
def test_fallocate_shows_in_st_blocks(mount):
    u, _, _ = mount
    with open(u.p("falloc"), "w+b") as f:
        f.write(b"head")
        f.flush()
        os.posix_fallocate(f.fileno(), 0, GAP)
        assert os.fstat(f.fileno()).st_blocks * 512 >= GAP
        assert os.stat(u.p("falloc")).st_size == GAP
    with open(u.p("keep"), "w+b") as f:
        f.write(b"k" * 4096)                    # a dirty page the host has not seen yet
        f.flush()
        before = os.fstat(f.fileno()).st_blocks
        fallocate(f.fileno(), FALLOC_FL_KEEP_SIZE, 4096, GAP)
        st = os.fstat(f.fileno())
        assert st.st_size == 4096 and st.st_blocks * 512 >= before * 512 + GAP
    assert os.stat(u.up("keep")).st_blocks == st.st_blocks == os.stat(u.p("keep")).st_blocks


@needs_root
def test_mtimes_stay_across_a_remount(fast_mount):
    u, _, _ = fast_mount
    written = [f"written{n}" for n in range(4)]
    for name in written:
        with open(u.p(name), "wb") as f:
            for k in range(32):
                f.write(bytes([k]) * GAP)
            f.flush()
            t = os.fstat(f.fileno()).st_mtime_ns
            os.sync()                    # writeback sends its mtime SETATTR beside the queued WRITEs
            assert os.fstat(f.fileno()).st_mtime_ns == t
        # sync(2) left nothing dirty: close() sends no later SETATTR to mend the host
        assert os.stat(u.up(name)).st_mtime_ns == t, name
    with open(u.p("touched"), "wb") as f:
        for k in range(64):                          # enough pages for several WRITEs
            f.write(bytes([k]) * 65536)
        f.flush()
        os.utime(f.fileno(), ns=(T_SET, T_SET))      # before the kernel wrote the pages back
    before = {n: os.stat(u.p(n)).st_mtime_ns for n in written + ["touched"]}
    assert before["touched"] == T_SET
    u.remount()
    after = {n: os.stat(u.p(n)).st_mtime_ns for n in written + ["touched"]}
    assert after == before
    assert os.stat(u.up("touched")).st_mtime_ns == T_SET


@needs_root
def test_lower_file_written_in_part_is_copied_up_whole(mount):
    u, _, _ = mount
    with open(u.p("lower.bin"), "r+b") as f:
        f.seek(5000)
        f.write(b"PATCH")
    want = LOWER[:5000] + b"PATCH" + LOWER[5005:]
    assert u.p("lower.bin").read_bytes() == want
    assert u.up("lower.bin").read_bytes() == want
    assert (u.lowers[0] / "lower.bin").read_bytes() == LOWER


@needs_root
def test_unlinked_file_takes_writes_through_its_fd(mount):
    u, _, _ = mount
    with open(u.p("gone"), "w+b") as f:
        f.write(b"1" * 5000)
        os.unlink(u.p("gone"))
        f.write(b"2" * 5000)
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        assert f.read() == b"1" * 5000 + b"2" * 5000
    assert not u.p("gone").exists()
    assert not u.up("gone").exists()


@needs_root
def test_truncate_to_the_same_size_keeps_its_mtime_across_a_remount(mount):
    u, _, writeback = mount
    for name in ("lower.bin", "upper.bin"):
        p = u.p(name)
        if name == "upper.bin":
            p.write_bytes(LOWER)
            os.utime(p, ns=(T_SET, T_SET))
        os.truncate(p, len(LOWER))
        seen = os.stat(p).st_mtime_ns
        if writeback:
            assert seen == (T_LOWER if name == "lower.bin" else T_SET)   # the kernel's own mtime
        u.remount()
        assert os.stat(u.p(name)).st_mtime_ns == seen, name


WRITER = r'''
import json, os, sys
mnt = sys.argv[1]
p = os.path.join(mnt, "new")
with open(p, "wb") as f:
    for _ in range(64):
        f.write(b"x" * 100)
with open(os.path.join(mnt, "lower.bin"), "r+b") as f:
    f.seek(5000)
    f.write(b"PATCH")
with open(os.path.join(mnt, "sparse"), "w+b") as f:
    os.pwrite(f.fileno(), b"d" * 4096, 1 << 20)
    data_at = os.lseek(f.fileno(), 0, os.SEEK_DATA)
print(json.dumps({"new": open(p, "rb").read() == b"x" * 6400, "data_at": data_at,
                  "lower": open(os.path.join(mnt, "lower.bin"), "rb").read()[4998:5007].hex()}))
'''


@needs_root
def test_writeback_mount_as_an_unprivileged_user(test_user):
    with scratch("fusesnap-wbu-") as base:
        (l0,), upper, work, mnt = layout(base, 1)
        mkfile(l0 / "lower.bin", LOWER)
        for d in (l0, upper, work, mnt):
            chown_tree(d, test_user.pw_uid, test_user.pw_gid)
        u = mount_union(FUSESNAP, mnt, [l0], upper, work, ["writeback=1"], user=test_user)
        try:
            prog = base / "writer.py"
            prog.write_text(WRITER)
            r = run_as(test_user, ["/usr/bin/python3", str(prog), str(mnt)], text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            got = json.loads(r.stdout)
        finally:
            u.unmount()
        assert got == {"new": True, "data_at": GAP, "lower": (LOWER[4998:5000] + b"PATCH" + LOWER[5005:5007]).hex()}
        assert (upper / "new").read_bytes() == b"x" * 6400


@needs_root
def test_deletes_copy_nothing_up(mount):
    """The writeback cache flushes the ctime of a file it unlinked (a SETATTR of the
    times): that is no reason to copy up the lower file, nor its other hard link."""
    u, _, _ = mount
    os.unlink(u.p("pair-a"))
    os.unlink(u.p("tree", "f"))
    os.rmdir(u.p("tree"))
    assert u.p("pair-b").read_bytes() == LOWER
    assert not u.up("pair-b").exists()
    assert sorted(os.listdir(u.upper)) == ["pair-a", "tree"]
    assert all(stat.S_ISCHR(os.lstat(u.up(n)).st_mode) for n in ("pair-a", "tree"))
