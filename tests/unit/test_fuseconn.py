"""How libfuse-style mount options become mount(2) arguments (linux/fuseconn.py), and the
options a connection mounted ahead gets (the same as the daemon's own mount would)."""

from __future__ import annotations

import os

import pytest

from fusesnap.fs.core.lowertree import build_lower_tree
from fusesnap.fs.core.union import Union
from fusesnap.fs.fuse.mount import fuse_options, planned_fuse_options
from fusesnap.fs.options import parse_options
from fusesnap.linux import fuseconn
from fusesnap.linux.fuseconn import MS_NOATIME, MS_NODEV, MS_NOSUID, MS_RDONLY


def test_options_become_source_type_flags_and_data():
    src, fstype, flags, data = fuseconn.mount_args(
        {"fsname=fusesnap:abc:7", "subtype=fusesnap", "default_permissions", "allow_other", "ro",
         "noatime", "nosuid", "nodev", "max_read=131072"})
    assert (src, fstype) == ("fusesnap:abc:7", "fuse.fusesnap")
    assert flags == MS_RDONLY | MS_NOATIME | MS_NOSUID | MS_NODEV
    assert sorted(data.split(",")) == ["allow_other", "default_permissions", "max_read=131072"]


def test_later_words_undo_earlier_ones_as_in_libfuse():
    # sorted order: "dev" before "nodev", "rw" after "ro": the flag set is what a set of words means
    assert fuseconn.mount_args({"suid"})[2] == 0
    assert fuseconn.mount_args({"subtype=x"})[:2] == ("x", "fuse.x")
    assert fuseconn.mount_args(set())[:3] == ("fuse", "fuse", 0)


@pytest.mark.parametrize("opt", ["auto_unmount", "blkdev", "fsname=a,b", "max_read=lots", "x-gvfs-hide"])
def test_an_option_mount2_does_not_take_is_refused(opt):
    with pytest.raises(ValueError):
        fuseconn.mount_args({opt})


def test_dev_fd_names_a_connection():
    assert fuseconn.connection_fd("/dev/fd/0") == 0
    assert fuseconn.connection_fd("/dev/fd/17") == 17
    for other in ("/dev/fd/", "/dev/fd/x", "/dev/fd/1/2", "/mnt", "dev/fd/3", b"/dev/fd/3"):
        assert fuseconn.connection_fd(other) is None
    r, w = os.pipe()
    try:
        assert not fuseconn.is_connection(r)
    finally:
        os.close(r)
        os.close(w)
    assert not fuseconn.is_connection(10_000)


@pytest.mark.parametrize("words", [["allow_other"], [], ["allow_other", "suid"], ["default_permissions"]])
@pytest.mark.parametrize("view", [False, True])
def test_planned_options_are_what_the_union_gets(tmp_path, words, view):
    """The daemon mounts the connection before the worker builds its Union: both must agree."""
    opts = parse_options(list(words))
    opts.fsname = "fusesnap:t:1"
    opts.read_only = view
    upper = work = None
    if not view:
        upper, work = tmp_path / "upper", tmp_path / "work"
        upper.mkdir()
        work.mkdir()
    union = Union(build_lower_tree([]), upper, work, opts)
    assert planned_fuse_options(opts, view) == fuse_options(union, opts)
    assert ("ro" in planned_fuse_options(opts, view)) == view
