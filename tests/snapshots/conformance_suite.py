"""containerd's snapshotter test suite (snapshots/testsuite) as a reusable suite, with real FUSE mounts.

Like containerd's testsuite, it runs once per snapshotter: a test module
imports every check from here and defines the `env` fixture that yields
(snapshotter, work dir). test_snapshotter_conformance.py runs it on the
in-process Snapshotter, test_snapshotter_conformance_grpc.py through
`fusesnap serve` and its gRPC client. A snapshotter here is anything with
the Snapshotter's methods plus mount(key, mountpoint) / umount(mountpoint),
`store` (the LayerStore, for exports) and chain_of(key).

Every behaviour of the suite has a test here, named after it. Changes are
applied through the mounted snapshot and checked against the same changes
applied to a plain directory (containerd's fstest.CheckDirectoryEqual: type,
permissions, owner, content, link target, link count). The suite runs with a
cleared umask, like containerd's clearMask().

The suite's metadata-only checks (PrepareView duplicates, Update, Remove and
key reuse, Walk with filters, StatInWalk, CloseTwice, RemoveIntermediateSnapshot)
mount nothing in containerd either; they live in test_snapshot_lifecycle.py.
Chains of 500 layers: test_snapshotter_500_layers.py.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pytest

from fusesnap.errors import InUse
from fusesnap.daemon.client import perform

if TYPE_CHECKING:
    from fusesnap.snapshots.snapshotter import Snapshotter

GC = {"containerd.io/gc.root": "conformance"}

NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the conformance suite chowns files (needs root)")

# -- fstest: appliers over a directory -------------------------------------------------------------

Applier = Callable[[Path], None]


def create_file(p: str, data: bytes, perm: int) -> Applier:
    def apply(root: Path) -> None:
        f = root / p.lstrip("/")
        f.write_bytes(data)
        os.chmod(f, perm)
    return apply


def create_dir(p: str, perm: int) -> Applier:
    def apply(root: Path) -> None:
        d = root / p.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, perm)
    return apply


def remove_all(p: str) -> Applier:
    def apply(root: Path) -> None:
        t = root / p.lstrip("/")
        if t.is_dir() and not t.is_symlink():
            shutil.rmtree(t)
        elif t.exists() or t.is_symlink():
            t.unlink()
    return apply


def chown(p: str, uid: int, gid: int) -> Applier:
    return lambda root: os.lchown(root / p.lstrip("/"), uid, gid)


def rename(old: str, new: str) -> Applier:
    return lambda root: os.rename(root / old.lstrip("/"), root / new.lstrip("/"))


def link(old: str, new: str) -> Applier:
    return lambda root: os.link(root / old.lstrip("/"), root / new.lstrip("/"))


def apply_all(*appliers: Applier) -> Applier:
    def apply(root: Path) -> None:
        for a in appliers:
            a(root)
    return apply


def tree(root: Path) -> dict[str, tuple]:
    """What CheckDirectoryEqual compares, per path (the root itself excluded)."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            common = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            if stat.S_ISREG(st.st_mode):
                out[rel] = common + (open(p, "rb").read(), st.st_nlink)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = common + (os.readlink(p),)
            else:
                out[rel] = common
    return out


def assert_same_tree(expected: Path, actual: Path) -> None:
    e, a = tree(expected), tree(actual)
    assert a == e, {k: (e.get(k), a.get(k)) for k in set(e) | set(a) if e.get(k) != a.get(k)}


# -- harness ------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clear_umask():
    old = os.umask(0)
    yield
    os.umask(old)


class Mounted:
    def __init__(self, sn: "Snapshotter", key: str, mp: Path) -> None:
        self.sn, self.key, self.mp = sn, key, mp

    def __enter__(self) -> Path:
        self.mp.mkdir(parents=True, exist_ok=True)
        assert self.sn.mount(self.key, self.mp) == 0
        return self.mp

    def __exit__(self, *exc) -> None:
        self.sn.umount(self.mp)


_counter = iter(range(1_000_000))


def create_snapshot(sn: Snapshotter, parent: str, work: Path, a: Applier) -> str:
    n = f"snap-{next(_counter)}"
    sn.prepare(n + "-prepare", parent, GC)
    with Mounted(sn, n + "-prepare", work / (n + "-mnt")) as mp:
        a(mp)
    sn.commit(n, n + "-prepare", GC)
    return n


def check_snapshot(sn: Snapshotter, work: Path, name: str, flat: Path) -> None:
    view = name + "-view"
    sn.view(view, name, GC)
    try:
        with Mounted(sn, view, work / (view + "-mnt")) as mp:
            assert_same_tree(flat, mp)
    finally:
        sn.remove(view)


def check_snapshots(sn: Snapshotter, work: Path, *appliers: Applier) -> list[str]:
    flat = work / f"flat-{next(_counter)}"
    flat.mkdir()
    parent, names = "", []
    for a in appliers:
        s = create_snapshot(sn, parent, work, a)
        a(flat)
        check_snapshot(sn, work, s, flat)
        names.append(s)
        parent = s
    return names


# -- the suite ---------------------------------------------------------------------------------------


def test_basic(env):
    sn, work = env
    initial = apply_all(create_file("/foo", b"foo\n", 0o777), create_dir("/a", 0o755),
                        create_dir("/a/b", 0o755), create_dir("/a/b/c", 0o755))
    diff = apply_all(create_file("/bar", b"bar\n", 0o777), create_file("/foo", b"bar\n", 0o777),
                     remove_all("/a/b"))
    mounts = sn.prepare("preparing", "", GC)
    assert mounts and mounts == sn.mounts("preparing")
    mp = work / "preparing"
    mp.mkdir()
    perform(mounts, mp)  # what a containerd client does with the returned mounts
    try:
        initial(mp)
    finally:
        sn.umount(mp)
    sn.commit("committed", "preparing", GC)
    si = sn.stat("committed")
    assert (si.parent, si.kind) == ("", "committed")
    with pytest.raises(Exception):
        sn.stat("preparing")

    sn.prepare("nextlayer", "committed", GC)
    flat = work / "flat"
    flat.mkdir()
    initial(flat)
    with Mounted(sn, "nextlayer", work / "nextlayer") as mp:
        assert_same_tree(flat, mp)
        diff(mp)
    ni = sn.stat("nextlayer")
    assert (ni.parent, ni.kind) == ("committed", "active")
    sn.commit("committed-next", "nextlayer", GC)
    si2 = sn.stat("committed-next")
    assert (si2.parent, si2.kind) == ("committed", "committed")

    walked = {}
    sn.walk(lambda i: walked.__setitem__(i.name, i))
    assert walked["committed"] == si and walked["committed-next"] == si2

    sn.view("nextnextlayer", "committed-next", GC)
    diff(flat)
    with Mounted(sn, "nextnextlayer", work / "nextnextlayer") as mp:
        assert_same_tree(flat, mp)
    sn.remove("nextnextlayer")
    with pytest.raises(InUse, match="remove"):
        sn.remove("committed")
    sn.remove("committed-next")
    sn.remove("committed")


def test_stat_active_while_mounted(env):
    sn, work = env
    sn.prepare("preparing", "", GC)
    with Mounted(sn, "preparing", work / "preparing") as mp:
        (mp / "foo").write_bytes(b"foo\n")
        si = sn.stat("preparing")
        assert (si.name, si.kind, si.parent) == ("preparing", "active", "")
        # an upper cannot be pulled out from under a live mount
        with pytest.raises(InUse, match="mounted"):
            sn.commit("c", "preparing")
        with pytest.raises(InUse, match="mounted"):
            sn.remove("preparing")
        other = work / "second"
        other.mkdir()
        try:   # two daemons must never share one upper: a second mount is refused...
            sn.mount("preparing", other)
        except InUse as e:
            assert "mounted" in str(e)
        else:  # ...or is the same filesystem (`fusesnap serve` hands out binds of its own mount)
            try:
                assert os.stat(other).st_dev == os.stat(mp).st_dev
            finally:
                sn.umount(other)


def test_stat_committed(env):
    sn, work = env
    sn.prepare("preparing", "", GC)
    with Mounted(sn, "preparing", work / "preparing") as mp:
        (mp / "foo").write_bytes(b"foo\n")
    sn.commit("committed", "preparing", GC)
    si = sn.stat("committed")
    assert (si.name, si.kind, si.parent) == ("committed", "committed", "")


def test_transitivity(env):
    sn, work = env
    sn.prepare("preparing", "", GC)
    with Mounted(sn, "preparing", work / "preparing") as mp:
        (mp / "foo").write_bytes(b"foo\n")
    sn.commit("snapA", "preparing", GC)
    sn.prepare("next", "snapA", GC)
    with Mounted(sn, "next", work / "next") as mp:
        (mp / "foo").write_bytes(b"foo bar\n")
    sn.commit("snapB", "next", GC)
    siA, siB = sn.stat("snapA"), sn.stat("snapB")
    assert siA.parent == "" and siB.parent == "snapA" and sn.stat(siB.parent).parent == ""


def test_layer_file_update(env):
    sn, work = env
    l1 = apply_all(create_dir("/etc", 0o700), create_file("/etc/hosts", b"mydomain 10.0.0.1", 0o644),
                   create_file("/etc/profile", b"PATH=/usr/bin", 0o644))
    l2 = apply_all(create_file("/etc/hosts", b"mydomain 10.0.0.2", 0o644),
                   create_file("/etc/profile", b"PATH=/usr/bin", 0o666), create_dir("/root", 0o700),
                   create_file("/root/.bashrc", b"PATH=/usr/sbin:/usr/bin", 0o644))
    for _ in range(2):  # containerd repeats to catch sporadic (time-dependent) failures
        check_snapshots(sn, work, l1, l2)


def test_remove_directory_in_lower_layer(env):
    sn, work = env
    check_snapshots(
        sn, work,
        apply_all(create_dir("/lib", 0o700), create_file("/lib/hidden", b"", 0o644)),
        apply_all(remove_all("/lib"), create_dir("/lib", 0o700), create_file("/lib/not-hidden", b"", 0o644)),
        apply_all(create_file("/lib/newfile", b"", 0o644)),
    )


def test_chown(env):
    sn, work = env
    check_snapshots(
        sn, work,
        apply_all(create_dir("/opt", 0o700), create_dir("/opt/a", 0o700), create_dir("/opt/a/b", 0o700),
                  create_file("/opt/a/b/file.txt", b"hello", 0o644)),
        apply_all(chown("/opt", 1, 1), chown("/opt/a", 1, 1), chown("/opt/a/b", 1, 1),
                  chown("/opt/a/b/file.txt", 1, 1)),
    )


def test_rename_of_a_lower_directory(env):
    """containerd skips the directory rename for overlayfs and fuse-overlayfs; fusesnap passes it."""
    sn, work = env
    names = check_snapshots(
        sn, work,
        apply_all(create_dir("/dir1", 0o700), create_dir("/somefiles", 0o700),
                  create_file("/somefiles/f1", b"was here first!", 0o644),
                  create_file("/somefiles/f2", b"nothing interesting", 0o644)),
        apply_all(rename("/dir1", "/dir2"), create_file("/somefiles/f1-overwrite", b"new content 1", 0o644),
                  rename("/somefiles/f1-overwrite", "/somefiles/f1"), rename("/somefiles/f2", "/somefiles/f3")),
    )
    # the committed layer is a plain OCI diff: old name whited out, new name opaque
    buf = io.BytesIO()
    sn.store.export(sn.chain_of(names[1])[-1], buf)
    got = tarfile.open(fileobj=io.BytesIO(buf.getvalue())).getnames()
    assert ".wh.dir1" in got and "dir2" in got and "somefiles/.wh.f2" in got


def test_directory_permission_on_commit(env):
    sn, work = env
    check_snapshots(
        sn, work,
        apply_all(create_dir("/dir1", 0o700), create_dir("/dir2", 0o700), create_dir("/dir3", 0o700),
                  create_dir("/dir4", 0o700), create_file("/dir4/f1", b"...", 0o644), create_dir("/dir5", 0o700),
                  create_file("/dir5/f1", b"...", 0o644), chown("/dir1", 1, 1), chown("/dir2", 1, 1),
                  chown("/dir3", 1, 1), chown("/dir5", 1, 1), chown("/dir5/f1", 1, 1)),
        apply_all(chown("/dir2", 0, 0), remove_all("/dir3"), chown("/dir4", 1, 1), chown("/dir4/f1", 1, 1)),
        apply_all(create_dir("/dir3", 0o700), chown("/dir3", 1, 1), remove_all("/dir5"),
                  create_dir("/dir5", 0o700), chown("/dir5", 1, 1)),
    )


def test_deleted_files_in_child_snapshot(env):
    sn, work = env
    check_snapshots(
        sn, work,
        apply_all(create_file("/foo", b"foo\n", 0o777), create_file("/foobar", b"foobar\n", 0o777)),
        apply_all(remove_all("/foobar")),
        apply_all(),
    )


def test_move_file_from_lower_layer(env):
    sn, work = env
    check_snapshots(
        sn, work,
        apply_all(create_dir("/dir1", 0o700), create_file("/dir1/f1", b"Hello", 0o644), create_dir("dir2", 0o700),
                  create_file("dir2/f2", b"...", 0o644)),
        apply_all(create_dir("/dir3", 0o700), create_file("/dir3/f1", b"Hello", 0o644), remove_all("/dir1"),
                  link("dir2/f2", "dir3/f2"), remove_all("dir2/f2")),
    )


def test_view_readonly(env):
    sn, work = env
    sn.prepare("preparing", "", GC)
    sn.commit("committed", "preparing", GC)
    sn.view("view", "committed", GC)
    with Mounted(sn, "view", work / "view-mount") as mp:
        with pytest.raises(OSError) as ei:
            (mp / "testfile").write_bytes(b"testcontent")
        assert ei.value.errno == errno.EROFS
    sn.remove("view")
    sn.remove("committed")


def test_root_permission(env):
    sn, work = env
    sn.prepare("preparing", "", GC)
    with Mounted(sn, "preparing", work / "preparing") as mp:
        assert stat.S_IMODE(os.stat(mp).st_mode) == 0o755


def layer_appliers(n: int) -> list[Applier]:
    """containerd's 128LayersMount: each layer overwrites a file, adds one, removes+recreates a dir."""
    out = [apply_all(create_file("/bottom", b"way at the bottom\n", 0o777),
                     create_file("/overwriteme", b"FIRST!\n", 0o777), create_dir("/addhere", 0o755),
                     create_dir("/onlyme", 0o755), create_file("/onlyme/bottom", b"bye!\n", 0o777))]
    for i in range(1, n):
        out.append(apply_all(create_file("/overwriteme", f"{i} WAS HERE!\n".encode(), 0o777),
                             create_file(f"/addhere/file-{i}", b"same\n", 0o755), remove_all("/onlyme"),
                             create_dir("/onlyme", 0o755), create_file(f"/onlyme/file-{i}", b"only me!\n", 0o777)))
    return out


@pytest.mark.slow
def test_128_layers_mount(env):
    sn, work = env
    flat = work / "flat"
    flat.mkdir()
    parent = ""
    for i, a in enumerate(layer_appliers(128)):
        key = f"prepare-layer-{i}"
        sn.prepare(key, parent, GC)
        with Mounted(sn, key, work / key) as mp:
            assert_same_tree(flat, mp)
            a(flat)
            a(mp)
            assert_same_tree(flat, mp)
        parent = f"committed-{i}"
        sn.commit(parent, key, GC)
        shutil.rmtree(work / key)
    assert len(sn.chain_of(parent)) == 128
    sn.view("fullview", parent, GC)
    with Mounted(sn, "fullview", work / "fullview") as mp:
        assert_same_tree(flat, mp)


def test_same_changes_through_mounts_commit_to_the_same_diff_id(env):
    """Deterministic commits: equal changes (times included) give equal diffIDs, whatever the wall clock."""
    sn, work = env
    base = create_snapshot(sn, "", work, apply_all(create_dir("/etc", 0o755), create_file("/etc/a", b"a", 0o644),
                                                    create_file("/etc/b", b"b", 0o644), create_dir("/lib", 0o755),
                                                    create_file("/lib/x", b"x", 0o644)))
    chains = []
    for i in range(2):
        if i == 1:
            time.sleep(1.1)  # a different second on the wall clock must not matter
        key = f"same-{i}"
        sn.prepare(key, base)
        with Mounted(sn, key, work / key) as mp:
            (mp / "etc" / "a").write_bytes(b"changed")
            (mp / "etc" / "b").unlink()
            (mp / "etc" / "link").hardlink_to(mp / "etc" / "a")
            shutil.rmtree(mp / "lib")
            (mp / "lib").mkdir()
            (mp / "new").symlink_to("etc/a")
            for p in [mp / "etc" / "a", mp / "etc", mp / "lib", mp]:
                os.utime(p, (1_500_000_000, 1_500_000_000))
            os.utime(mp / "new", (1_500_000_000, 1_500_000_000), follow_symlinks=False)
        chains.append(sn.chain_of(sn.commit(f"same-c{i}", key).name)[-1])
    assert chains[0] == chains[1]
    buf = io.BytesIO()
    sn.store.export("same-c0", buf)
    tf = tarfile.open(fileobj=io.BytesIO(buf.getvalue()))
    by = {m.name: m for m in tf.getmembers()}
    assert by["etc/link"].islnk() and by["etc/link"].linkname == "etc/a"
    assert by["etc/.wh.b"].mtime == 1_500_000_000 and "lib/.wh..wh..opq" in by


def test_prepare_view_duplicates_after_a_mount(env):
    sn, work = env
    sn.prepare("preparing", "", GC)
    with Mounted(sn, "preparing", work / "preparing"):
        pass
    sn.commit("snapA", "preparing", GC)
    sn.prepare("newlayer", "snapA", GC)
    with pytest.raises(Exception, match="already exists"):
        sn.view("newlayer", "snapA", GC)
    sn.view("viewLayer", "snapA", GC)
    with pytest.raises(Exception, match="already exists"):
        sn.view("viewLayer", "snapA", GC)


def test_remove_intermediate_snapshot(env):
    sn, work = env
    sn.prepare("base", "", GC)
    with Mounted(sn, "base", work / "base") as mp:
        (mp / "f").write_bytes(b"base")
    sn.commit("committed-base", "base", GC)
    sn.prepare("intermediate", "committed-base", GC)
    sn.commit("committed-inter", "intermediate", GC)
    sn.prepare("toplayer", "committed-inter", GC)
    with pytest.raises(InUse, match="remove"):
        sn.remove("committed-inter")
    sn.remove("toplayer")
    sn.remove("committed-inter")
    sn.remove("committed-base")
