"""Core mount tests of the filesystem API (fusesnap.fs.fuse.mount) that the snapshotter builds on."""

from __future__ import annotations

import os
import stat
import struct
import subprocess

import pytest

from helpers import is_mounted, unmount

from fusesnap.fs.core.lower import DirLower, IndexLower
from fusesnap.fs.core.lowertree import LowerTree, build_lower_tree
from fusesnap.fs.fuse.mount import mount
from fusesnap.fs.options import MountOptions
from fusesnap.layerentry import LayerEntry

CAP = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)   # v2 file caps: cap_net_raw+ep
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="presents root-owned index metadata; needs root")


def E(path: bytes, kind="reg", mode=0o644, **kw) -> LayerEntry:
    kw.setdefault("uid", 0)
    kw.setdefault("gid", 0)
    kw.setdefault("mtime_ns", 946684800 * 10**9)
    return LayerEntry(path=path, kind=kind, mode=mode, **kw)


@pytest.fixture
def store_layer(shared_tmp):
    """An index-backed layer: content in fs/, metadata only in the entries."""
    fs = shared_tmp / "layer" / "fs"
    (fs / "d").mkdir(parents=True)
    (fs / "d" / "su").write_bytes(b"#!/bin/sh\n")
    (fs / "big").write_bytes(b"\0" * (3 << 20))
    entries = [E(b"bin", "dir", 0o755), E(b"bin/su", mode=0o4755, uid=0, gid=0, size=10, data=b"d/su",
                                           xattrs={b"security.capability": CAP}),
               E(b"bin/su-link", "hard", linkname=b"bin/su"),
               E(b"dev", "dir", 0o755), E(b"dev/null", "chr", 0o666, devmajor=1, devminor=3),
               E(b"home", "dir", 0o750, uid=1000, gid=1000), E(b"big", size=3 << 20, data=b"big")]
    return IndexLower(entries, fs)


def _mount(shared_tmp, tree, **kw):
    upper, work, mnt = shared_tmp / "upper", shared_tmp / "work", shared_tmp / "mnt"
    for p in (upper, work, mnt):
        p.mkdir(exist_ok=True)
    assert mount(tree, upper, work, mnt, MountOptions(**kw)) == 0
    assert is_mounted(mnt), "mount() returned before the mount was live"
    return upper, mnt


def test_index_lower_presents_index_metadata_not_the_host_files(shared_tmp, store_layer):
    upper, mnt = _mount(shared_tmp, build_lower_tree([store_layer]))
    try:
        su = os.lstat(mnt / "bin" / "su")
        assert stat.S_IMODE(su.st_mode) == 0o4755 and (su.st_uid, su.st_gid) == (0, 0)
        assert os.lstat(mnt / "bin" / "su-link").st_ino == su.st_ino and su.st_nlink == 2
        assert os.getxattr(mnt / "bin" / "su", "security.capability") == CAP
        null = os.lstat(mnt / "dev" / "null")
        assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
        home = os.lstat(mnt / "home")
        assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (1000, 1000, 0o750)
        assert (mnt / "bin" / "su").read_bytes() == b"#!/bin/sh\n"
        assert os.lstat(mnt / "bin" / "su").st_mtime_ns == 946684800 * 10**9
        # host files were never made setuid
        assert not os.lstat(store_layer.data_root / "d" / "su").st_mode & stat.S_ISUID
    finally:
        unmount(mnt)


def test_a_cached_tree_mounts_and_deletes_never_copy_data(shared_tmp, store_layer):
    cache = shared_tmp / "tree.cache"
    build_lower_tree([store_layer]).save(cache)
    upper, mnt = _mount(shared_tmp, LowerTree.load(cache))
    try:
        os.unlink(mnt / "big")
        subprocess.run(["rm", "-rf", str(mnt / "bin")], check=True)
        assert sorted(os.listdir(mnt)) == ["dev", "home"]
        for name in ("big", "bin"):
            st = os.lstat(upper / name)
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, f"{name} is not a whiteout"
        assert sum(f.stat().st_size for f in upper.rglob("*") if f.is_file()) == 0
    finally:
        unmount(mnt)


def test_copy_up_of_a_big_file_keeps_inode_and_the_loop_serves_meanwhile(shared_tmp, store_layer):
    upper, mnt = _mount(shared_tmp, build_lower_tree([store_layer]))
    try:
        ino = os.lstat(mnt / "big").st_ino
        with open(mnt / "big", "r+b") as f:
            f.seek(0, 2)
            f.write(b"!")
        st = os.lstat(mnt / "big")
        assert st.st_ino == ino and st.st_size == (3 << 20) + 1
        assert os.path.getsize(upper / "big") == (3 << 20) + 1
    finally:
        unmount(mnt)


def test_negative_entries_are_cached_and_creating_the_name_still_works(shared_tmp, store_layer):
    upper, mnt = _mount(shared_tmp, build_lower_tree([store_layer]), timeout=3600)
    try:
        for _ in range(3):
            assert not os.path.lexists(mnt / "later")
        (mnt / "later").write_bytes(b"x")
        assert (mnt / "later").read_bytes() == b"x"
        os.unlink(mnt / "later")
        assert not os.path.lexists(mnt / "later")
        os.mkdir(mnt / "later")
        assert os.path.isdir(mnt / "later")
    finally:
        unmount(mnt)


def test_mount_api_reports_failures_without_daemonizing(shared_tmp, store_layer, capfd):
    tree = build_lower_tree([store_layer])
    rc = mount(tree, shared_tmp / "no-upper", None, shared_tmp / "no-mnt", MountOptions())
    assert rc == 1
    assert "does not exist" in capfd.readouterr().err


def test_cached_listings_follow_every_change_made_through_the_mount(shared_tmp, store_layer):
    """Listings are cached by the kernel (cache_readdir); changes must still show at once."""
    upper, mnt = _mount(shared_tmp, build_lower_tree([store_layer]))
    try:
        b, h = mnt / "bin", mnt / "home"
        assert sorted(os.listdir(b)) == ["su", "su-link"]
        assert sorted(os.listdir(b)) == ["su", "su-link"]          # served from the cache
        (b / "new").write_bytes(b"1")
        assert sorted(os.listdir(b)) == ["new", "su", "su-link"]
        os.rename(b / "su", h / "su")
        assert sorted(os.listdir(b)) == ["new", "su-link"] and os.listdir(h) == ["su"]
        os.unlink(b / "su-link")
        os.mkdir(b / "sub")
        assert sorted(os.listdir(b)) == ["new", "sub"]
        os.rename(h, mnt / "home2")
        assert sorted(os.listdir(mnt)) == ["big", "bin", "dev", "home2"]
        assert os.listdir(mnt / "home2") == ["su"]
    finally:
        unmount(mnt)


def test_requests_are_served_while_a_big_copy_up_runs_in_a_thread(shared_tmp):
    """Concurrent clients during a worker-thread copy-up: nobody hangs, data stays right."""
    import threading
    low = shared_tmp / "low"
    (low / "d").mkdir(parents=True)
    with open(low / "huge", "wb") as f:
        f.write(os.urandom(1 << 20) * 48)
    for n in range(50):
        (low / "d" / f"f{n}").write_bytes(b"%d" % n)
    upper, mnt = _mount(shared_tmp, build_lower_tree([DirLower(low)]))
    errors: list[BaseException] = []

    def appender() -> None:
        try:
            with open(mnt / "huge", "ab") as f:
                f.write(b"tail")
        except BaseException as e:   # reported below
            errors.append(e)

    def reader() -> None:
        try:
            for _ in range(20):
                for n in range(50):
                    assert (mnt / "d" / f"f{n}").read_bytes() == b"%d" % n
        except BaseException as e:
            errors.append(e)
    try:
        threads = [threading.Thread(target=appender)] + [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert not errors, errors
        assert os.path.getsize(mnt / "huge") == 48 * (1 << 20) + 4
        with open(mnt / "huge", "rb") as f, open(low / "huge", "rb") as g:
            assert f.read(1 << 20) == g.read(1 << 20)
    finally:
        unmount(mnt)


def test_warm_up_leaves_nothing_behind(monkeypatch):
    """The warm-up of an idle spare or a standby worker (a union and its operations over
    an empty tree, the busy-poll default) opens nothing it keeps and records no lower
    tree as loaded or used."""
    from fusesnap.fs.fuse import fastloop, mount as mounting
    from fusesnap.fs.fuse.operations import Operations

    built = []
    real_init = Operations.__init__

    def spy(self, union):
        real_init(self, union)
        built.append(union)

    monkeypatch.setattr(mounting, "_warmed", False)
    monkeypatch.setattr(mounting, "_busy_poll_default", None)
    monkeypatch.setattr(Operations, "__init__", spy)
    fds = sorted(os.listdir("/proc/self/fd"))
    loaded, used = list(mounting.loaded_from_disk), list(mounting.used_kept)
    mounting.warm_up()
    mounting.warm_up()                      # once per process
    assert len(built) == 1 and built[0].readonly
    assert mounting._busy_poll_default == fastloop.default_busy_poll_us()
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert (mounting.loaded_from_disk, mounting.used_kept) == (loaded, used)
