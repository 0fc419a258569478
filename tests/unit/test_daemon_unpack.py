"""Which snapshot keys are containerd's unpacking ones (daemon/unpack.py), and their options."""

from __future__ import annotations

import pytest

from fusesnap.daemon.unpack import is_unpack_key, mount_options
from fusesnap.snapshots.mounting import split_mount_options


@pytest.mark.parametrize("key, unpack", [
    ("extract-1234 sha256:" + "a" * 64, True),             # containerd's UnpackKeyFormat
    ("default/12/extract-1234 sha256:" + "a" * 64, True),  # as a proxy snapshotter sees it
    ("k8s.io/3/extract-99-abc sha256:" + "b" * 64, True),
    ("default/13/my-container", False),
    ("default/extract-1/container", False),                # only the last component counts
    ("", False),
])
def test_unpack_keys_are_known_by_containerds_prefix(key, unpack):
    assert is_unpack_key(key) is unpack
    assert mount_options(key) == (["writeback=1"] if unpack else [])


def test_a_fuse3_mounts_options_split_as_the_helper_and_mount_all_read_them():
    kv, own = split_mount_options(["rw,allow_other,root=/r,snapshot=default/1/extract-1 x", "writeback=1,nofail"])
    assert kv == {"root": "/r", "snapshot": "default/1/extract-1 x"}
    assert own == ["allow_other", "writeback=1"]
