"""A full upper filesystem: the write that does not fit fails with ENOSPC, and nothing is lost.

Kernel overlayfs is the reference (every test runs on it too). fusesnap passes each WRITE
straight to the host file, so the write(2) that finds no space is the one that fails, the
size seen through the mount is what the upper holds, and a copy-up that does not fit
leaves the lower file as it was and no half copy behind. This is why `-o writeback=1`
stays off by default: with the kernel's writeback cache (fuse-overlayfs's default) writes
land in the page cache and only a later close() or fsync() reports ENOSPC, while the size
already shows data the disk never took (the last test pins that the error is not lost).
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from helpers import is_root
from unionmount import FUSESNAP, KINDS, Union, layout, mkfile, mount_union, scratch

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root to mount tmpfs and overlays")

MiB = 1 << 20
UPPER_FS = 8 * MiB            # tmpfs holding upper and work
BIG_LOWER = bytes(range(256)) * (12 * MiB // 256)     # does not fit in the upper


def _fill(path: Path, chunks: int) -> tuple[int, OSError | None]:
    """Write 1 MiB chunks; return the bytes written and the error that stopped it."""
    done = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(chunks):
            try:
                done += os.write(fd, b"z" * MiB)
            except OSError as e:
                return done, e
    finally:
        try:
            os.close(fd)
        except OSError as e:
            return done, e
    return done, None


@pytest.fixture
def small_upper() -> Iterator[tuple[Path, Path, Path, Path]]:
    """A lower holding a 12 MiB file, upper and work on an 8 MiB tmpfs, a mount point."""
    with scratch("fusesnap-full-") as base:
        (l0,), _, _, mnt = layout(base, 1)
        mkfile(l0 / "big.bin", BIG_LOWER)
        mkfile(l0 / "small.txt", b"kept\n")
        fs = base / "small"
        fs.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={UPPER_FS},mode=0755", "tmpfs", str(fs)], check=True)
        try:
            (fs / "upper").mkdir()
            (fs / "work").mkdir()
            yield l0, fs / "upper", fs / "work", mnt
        finally:
            subprocess.run(["umount", "-l", str(fs)], check=False)


def _mount(kind: str, small_upper, extra: list[str] | None = None) -> Union:
    l0, upper, work, mnt = small_upper
    return mount_union(kind, mnt, [l0], upper, work, extra or [])


@pytest.mark.parametrize("kind", KINDS)
def test_the_write_that_does_not_fit_fails_and_the_size_is_what_the_upper_took(kind, small_upper):
    u = _mount(kind, small_upper)
    try:
        done, err = _fill(u.p("fill"), 2 * UPPER_FS // MiB)
        assert err is not None and err.errno == errno.ENOSPC, (done, err)
        assert 0 < done <= UPPER_FS
        assert os.stat(u.p("fill")).st_size == done == os.stat(u.up("fill")).st_size
        assert u.p("fill").read_bytes() == b"z" * done
        # the mount keeps working: the space comes back and new writes fit
        os.unlink(u.p("fill"))
        assert _fill(u.p("again"), 1) == (MiB, None)
        assert u.p("small.txt").read_bytes() == b"kept\n"
    finally:
        u.unmount()


@pytest.mark.parametrize("kind", KINDS)
def test_a_copy_up_that_does_not_fit_leaves_the_lower_file_and_no_half_copy(kind, small_upper):
    u = _mount(kind, small_upper)
    try:
        with pytest.raises(OSError) as e:
            with open(u.p("big.bin"), "ab") as f:
                f.write(b"one more byte")
        assert e.value.errno == errno.ENOSPC
        assert os.stat(u.p("big.bin")).st_size == len(BIG_LOWER)
        assert u.p("big.bin").read_bytes() == BIG_LOWER
        assert not u.up("big.bin").exists()
        left = [p for p in u.upper.parent.rglob("*") if p.is_file() and p.stat().st_size > 0]
        assert left == [], left          # nothing of the failed copy takes up the space
        # and the space is all there for what fits
        assert _fill(u.p("fits"), 4) == (4 * MiB, None)
    finally:
        u.unmount()


def test_with_writeback_the_error_comes_late_but_is_not_lost(small_upper):
    u = _mount(FUSESNAP, small_upper, ["writeback=1"])
    try:
        done, err = _fill(u.p("fill"), 2 * UPPER_FS // MiB)
        if err is None:             # all writes cached: fsync must report what close did not
            fd = os.open(u.p("fill"), os.O_WRONLY)
            try:
                with pytest.raises(OSError) as e:
                    os.fsync(fd)
                err = e.value
            finally:
                os.close(fd)
        assert err.errno == errno.ENOSPC
        assert os.stat(u.up("fill")).st_size <= UPPER_FS
    finally:
        u.unmount()
