"""Read-ahead of a live mount (fusesnap/fs/readahead.py): set on a real FUSE mount as root,
found through mountinfo even for mount points with escaped names, a no-op without the right
to write sysfs; and the read_ahead_kb= mount option."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from fusesnap.errors import InvalidInput
from fusesnap.fs.options import parse_options
from fusesnap.fs.fuse import splicing
from fusesnap.fs.fuse.readahead import DEFAULT_KB, device_of, read_ahead_kb, set_read_ahead
from helpers import is_root, run_as
from unionmount import FUSESNAP, mount_union


def _sysfs_value(mnt: Path) -> int:
    st = os.stat(mnt)
    return int(Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb").read_text())


@pytest.fixture
def mounted(shared_tmp: Path):
    """A fusesnap-overlay mount whose mount point name needs mountinfo's octal escapes."""
    if not is_root():
        pytest.skip("needs root to mount for every user and to write sysfs")
    lower, upper, work = shared_tmp / "lower", shared_tmp / "upper", shared_tmp / "work"
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "f").write_bytes(b"x" * 100)
    mnt = shared_tmp / "mount point\twith\\escapes"
    un = mount_union(FUSESNAP, mnt, [lower], upper, work)
    # the daemon sets its own read-ahead during its first 0.55 s (fusesnap/fs/mount.py):
    # let that pass, so it cannot overwrite what a test sets
    os.stat(mnt)
    time.sleep(0.7)
    try:
        yield mnt
    finally:
        un.unmount()


def test_root_sets_the_read_ahead_of_a_live_mount(mounted: Path):
    st = os.stat(mounted)
    assert device_of(mounted) == f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for kb in (4096, 256):
        assert set_read_ahead(mounted, kb) is True
        assert _sysfs_value(mounted) == kb
        assert read_ahead_kb(mounted) == kb
    assert (mounted / "f").read_bytes() == b"x" * 100


def test_without_permission_nothing_changes(mounted: Path, test_user):
    set_read_ahead(mounted, 384)
    code = ("import json, logging, sys; logging.basicConfig(level=logging.DEBUG);"
            "from fusesnap.fs.fuse.readahead import set_read_ahead;"
            "print(json.dumps(set_read_ahead(sys.argv[1], 8192)))")
    r = run_as(test_user, [sys.executable, "-c", code, str(mounted)], text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) is False
    assert "read-ahead" in r.stderr and "not writable" in r.stderr, r.stderr
    assert _sysfs_value(mounted) == 384


def test_a_directory_that_is_no_mount_point_is_left_alone(tmp_path: Path):
    assert device_of(tmp_path) is None
    assert set_read_ahead(tmp_path, 2048) is False
    assert read_ahead_kb(tmp_path) is None


def test_mountinfo_escapes_and_the_top_most_mount_win(tmp_path: Path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /a\\040b rw - proc proc rw\n"
        "30 22 0:41 / /a\\040b rw - fuse.x x rw\n"
        "31 1 0:42 / /c\\011d\\134e rw - fuse.y y rw\n"
        "32 1 0:43 / /a rw - fuse.z z rw\n")
    assert device_of("/a b", str(info)) == "0:41"
    assert device_of("/c\td\\e", str(info)) == "0:42"
    assert device_of("/a", str(info)) == "0:43"
    assert device_of("/nowhere", str(info)) is None


def test_negative_size_is_refused(tmp_path: Path):
    with pytest.raises(ValueError):
        set_read_ahead(tmp_path, -1)


def test_read_ahead_kb_mount_option():
    assert parse_options([]).read_ahead_kb is None
    assert parse_options(["lowerdir=/l,read_ahead_kb=4096"]).read_ahead_kb == 4096
    for bad in ("read_ahead_kb=lots", "read_ahead_kb=-5", "read_ahead_kb="):
        with pytest.raises(InvalidInput):
            parse_options([bad])



# 1 MiB, or the largest READ libfuse can splice without CAP_SYS_RESOURCE (fs/splicing.py)
_DEFAULT = splicing.read_ahead_that_splices(DEFAULT_KB, splicing.max_spliced_read())


@pytest.mark.parametrize("option, want", [(None, _DEFAULT), ("read_ahead_kb=512", 512)])
def test_the_daemon_sets_its_mounts_read_ahead(shared_tmp: Path, option: str | None, want: int):
    """fusesnap-overlay raises its own mount's read-ahead after FUSE_INIT (1 MiB requests,
    or what still splices), or to what read_ahead_kb= asks."""
    if not is_root():
        pytest.skip("needs root to write sysfs")
    lower, upper, work, mnt = (shared_tmp / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work):
        d.mkdir()
    un = mount_union(FUSESNAP, mnt, [lower], upper, work, [option] if option else [])
    try:
        deadline = time.monotonic() + 10
        while _sysfs_value(mnt) != want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _sysfs_value(mnt) == want
    finally:
        un.unmount()
