"""Ownership and metadata options of fusesnap-overlay (fuse-overlayfs vocabulary), as root:
squash_to_root / squash_to_uid / squash_to_gid, uidmapping / gidmapping, static_nlink, noxattrs,
xattr_permissions. Kernel overlayfs has none of these: fusesnap only."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from helpers import is_root
from unionmount import FUSESNAP, Union, errno_of, layout, mkdir, mkfile, mount_union

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root to mount and to set owners")


def _mount(base: Path, extra: list[str]) -> Union:
    lowers, upper, work, mnt = layout(base, 2)
    mkfile(lowers[1] / "f", "f", 0o640, uid=0, gid=0)
    mkfile(lowers[1] / "g", "g", 0o644, uid=5, gid=6)
    mkfile(lowers[1] / "far", "far", 0o644, uid=500, gid=500)
    mkdir(lowers[1] / "d", 0o755, uid=1, gid=1)
    mkdir(lowers[1] / "d" / "sub")
    mkdir(lowers[0] / "d", 0o755, uid=1, gid=1)
    mkdir(lowers[0] / "d" / "sub2")
    mkfile(lowers[0] / "x", "x", xattrs={"user.lower": b"L"})
    return mount_union(FUSESNAP, mnt, lowers, upper, work, extra)


@pytest.fixture
def mount(shared_tmp):
    mounted: list[Union] = []

    def _do(extra: list[str]) -> Union:
        mounted.append(_mount(shared_tmp, extra))
        return mounted[-1]

    yield _do
    for m in mounted:
        m.unmount()


def _owners(u: Union) -> dict[str, tuple[int, int]]:
    return {n: (os.lstat(u.p(n)).st_uid, os.lstat(u.p(n)).st_gid) for n in ("", "f", "g", "far", "d", "d/sub", "new")}


def test_squash_to_root(mount):
    u = mount(["squash_to_root"])
    u.p("new").write_text("n")
    assert set(_owners(u).values()) == {(0, 0)}


def test_squash_to_uid_and_gid_take_precedence_over_root(mount):
    u = mount(["squash_to_root", "squash_to_uid=1234", "squash_to_gid=4321"])
    u.p("new").write_text("n")
    assert set(_owners(u).values()) == {(1234, 4321)}
    os.chown(u.p("g"), 7, 7)  # accepted, still presented squashed
    assert (os.lstat(u.p("g")).st_uid, os.lstat(u.p("g")).st_gid) == (1234, 4321)


def test_squash_to_uid_alone_keeps_gids(mount):
    u = mount(["squash_to_uid=99"])
    assert (os.lstat(u.p("g")).st_uid, os.lstat(u.p("g")).st_gid) == (99, 6)


def test_uid_and_gid_mapping(mount):
    # on-disk:presented:len triples; several ranges in one option; a leading ':' is accepted
    u = mount(["uidmapping=0:1000:1:1:2000:10", "gidmapping=:0:3000:1:1:4000:10"])
    got = {n: (os.lstat(u.p(n)).st_uid, os.lstat(u.p(n)).st_gid) for n in ("f", "g", "far", "d")}
    assert got["f"] == (1000, 3000)
    assert got["g"] == (2004, 4005)
    assert got["d"] == (2000, 4000)
    assert got["far"] == (65534, 65534), "unmapped ids show as the overflow id"
    os.chown(u.p("g"), 2001, 4002)  # presented ids go back to disk through the map
    st = os.lstat(u.up("g"))
    assert (st.st_uid, st.st_gid) == (2, 3)
    assert (os.lstat(u.p("g")).st_uid, os.lstat(u.p("g")).st_gid) == (2001, 4002)
    u.remount()
    assert (os.lstat(u.p("g")).st_uid, os.lstat(u.p("g")).st_gid) == (2001, 4002)
    assert (os.lstat(u.p("f")).st_uid, os.lstat(u.p("f")).st_gid) == (1000, 3000)


def test_static_nlink(mount):
    u = mount(["static_nlink"])
    os.mkdir(u.p("d", "new"))
    for n in ("", "d", "d/sub", "d/new"):
        assert os.lstat(u.p(n)).st_nlink == 1, n
    assert os.lstat(u.p("f")).st_nlink == 1


def test_noxattrs(mount):
    u = mount(["noxattrs"])
    assert errno_of(os.setxattr, u.p("f"), "user.x", b"1") == errno.EOPNOTSUPP
    assert errno_of(os.getxattr, u.p("x"), "user.lower") in (errno.EOPNOTSUPP, errno.ENODATA)
    try:
        assert os.listxattr(u.p("x")) == []
    except OSError as e:
        assert e.errno == errno.EOPNOTSUPP
    assert not os.path.lexists(u.up("f")), "a refused setxattr must not copy up"
    u.p("new").write_text("still writable")
    assert u.up("new").read_text() == "still writable"


@pytest.mark.parametrize("level,xattr", [(1, "security.fuseoverlayfs.override_stat"),
                                         (2, "user.fuseoverlayfs.override_stat")])
def test_xattr_permissions_store_owner_and_mode_in_an_xattr(mount, level, xattr):
    u = mount([f"xattr_permissions={level}"])
    os.chown(u.p("g"), 1234, 5678)
    os.chmod(u.p("g"), 0o4750)
    st = os.lstat(u.p("g"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o4750)
    real = os.lstat(u.up("g"))
    assert (real.st_uid, real.st_gid) != (1234, 5678), "the upper file itself must not be chowned"
    value = os.getxattr(u.up("g"), xattr).decode()
    uid, gid, mode = value.split(":")[:3]
    assert (int(uid), int(gid), int(mode, 8) & 0o7777) == (1234, 5678, 0o4750)
    assert xattr not in os.listxattr(u.p("g")), "the override xattr is internal"
    assert u.p("g").read_text() == "g"
    u.remount()
    st = os.lstat(u.p("g"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o4750), "after remount"
