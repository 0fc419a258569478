"""READ replies spliced from the host file (pyfuse3 patch 0009, fs/splicing.py): the
bytes are the file's at every offset and size, across its end, for lower and upper
files; replies libfuse could not splice whole are read by the daemon instead."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pyfuse3
import pytest

from fusesnap.fs.fuse import splicing
from fusesnap.fs.core.lowertree import lower_tree_from_dirs
from fusesnap.fs.fuse.operations import Operations
from fusesnap.fs.options import MountOptions
from fusesnap.fs.core.union import Union
from helpers import is_root
from unionmount import FUSESNAP, layout, mount_union


def test_without_cap_sys_resource_a_reply_must_fit_a_pipe_of_pipe_max_size(tmp_path: Path) -> None:
    status, pmax = tmp_path / "status", tmp_path / "pipe-max-size"
    pmax.write_text("1048576\n")
    status.write_text("Name:\tx\nCapEff:\t000001fffeffffff\n")      # CAP_SYS_RESOURCE (24) dropped
    limit = splicing.max_spliced_read(str(status), str(pmax))
    assert limit == 1048576 - 3 * splicing.PAGE - 16
    assert splicing.read_ahead_that_splices(1024, limit) * 1024 <= limit
    assert splicing.read_ahead_that_splices(128, limit) == 128
    status.write_text("Name:\tx\nCapEff:\t000001ffffffffff\n")
    assert splicing.max_spliced_read(str(status), str(pmax)) is None
    assert splicing.read_ahead_that_splices(1024, None) == 1024


async def test_read_answers_with_the_host_fd_up_to_the_splice_limit(tmp_path: Path) -> None:
    low, up = tmp_path / "low", tmp_path / "up"
    low.mkdir()
    up.mkdir()
    (low / "f").write_bytes(b"f" * 10000)
    ops = Operations(Union(lower_tree_from_dirs([low]), up, None, MountOptions()))
    assert ops.splice_max > 0
    ino = (await ops.lookup(pyfuse3.ROOT_INODE, b"f")).st_ino
    fd = await ops.read(ino, 0, 8192)
    assert isinstance(fd, int) and os.pread(fd, 3, 0) == b"fff"
    ops.splice_max = 4096                      # a reply over the limit comes as bytes
    assert await ops.read(ino, 9000, 8192) == b"f" * 1000


@pytest.mark.skipif(not is_root(), reason="needs root to mount without fusermount3")
def test_reads_at_every_offset_and_size_return_the_file(shared_tmp: Path) -> None:
    assert getattr(pyfuse3, "READ_FD", False), "the patched pyfuse3 (third_party/pyfuse3) is not installed"
    rnd = random.Random(5)
    lowers, upper, work, mnt = layout(shared_tmp, 1)
    data = rnd.randbytes(3 * (1 << 20) + 123)
    (lowers[0] / "big").write_bytes(data)
    (lowers[0] / "small").write_bytes(data[:5000])
    u = mount_union(FUSESNAP, mnt, lowers, upper, work, [])
    try:
        def check(name: str, want: bytes) -> None:
            fd = os.open(u.p(name), os.O_RDONLY)
            try:
                for size in (1, 4095, 8192, 131072, 1 << 20, 2 << 20):
                    for off in (0, 1, 4096 * 3 + 7, len(want) - size // 2, len(want) - 1, len(want), len(want) + 9):
                        off = max(off, 0)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # READs, not the page cache
                        assert os.pread(fd, size, off) == want[off:off + size], (name, size, off)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                got = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
                assert got == want
            finally:
                os.close(fd)

        check("big", data)
        check("small", data[:5000])
        with open(u.p("big"), "r+b") as f:          # copied up: the upper file answers
            f.seek(1 << 20)
            f.write(b"X" * 10)
        check("big", data[:1 << 20] + b"X" * 10 + data[(1 << 20) + 10:])
        assert (upper / "big").read_bytes()[(1 << 20):(1 << 20) + 10] == b"X" * 10
    finally:
        u.unmount()
