"""Chains far beyond kernel overlay's 500-lower limit mount and work; lower trees are cached per chainID.

The layers are generated as tars (containerd's 128LayersMount pattern: overwrite
a file, add one, remove and recreate a directory) and imported, rather than
built by 500 mount/commit cycles; the mounts then prove every sampled layer's
view equals the flat expectation, and that work on top of layer 500 commits.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile

import pytest

from fusesnap.snapshots.snapshotter import Snapshotter
from fusesnap.snapshots.treecache import TreeCache
from test_snapshotter_conformance import Mounted, assert_same_tree, layer_appliers

T = 1_600_000_000

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="compares root-owned trees (needs root)")


def layer_tar(i: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, data: bytes | None, mode: int) -> None:
            ti = tarfile.TarInfo(name)
            ti.mode, ti.mtime = mode, T
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        if i == 0:
            add("bottom", b"way at the bottom\n", 0o777)
            add("overwriteme", b"FIRST!\n", 0o777)
            add("addhere", None, 0o755)
            add("onlyme", None, 0o755)
            add("onlyme/bottom", b"bye!\n", 0o777)
        else:
            add("addhere", None, 0o755)
            add(f"addhere/file-{i}", b"same\n", 0o755)
            add("onlyme", None, 0o755)
            add("onlyme/.wh..wh..opq", b"", 0)
            add(f"onlyme/file-{i}", b"only me!\n", 0o777)
            add("overwriteme", f"{i} WAS HERE!\n".encode(), 0o777)
    return buf.getvalue()


def import_chain(sn: Snapshotter, n: int, start_parent: str | None = None) -> list[str]:
    chains, parent = [], start_parent
    for i in range(n):
        parent = sn.store.import_tar(io.BytesIO(layer_tar(i)), parent).chain_id
        chains.append(parent)
    return chains


@pytest.fixture
def env(shared_tmp):
    old = os.umask(0)
    sn = Snapshotter(shared_tmp / "root")
    work = shared_tmp / "work"
    work.mkdir()
    yield sn, work
    sn.close()
    os.umask(old)


@pytest.mark.slow
def test_500_layers_mount_and_work(env):
    sn, work = env
    n = 500
    chains = import_chain(sn, n)
    assert len(sn.store.chain(chains[-1])) == n
    # every layer's merged tree (what its mount serves) against the expectation...
    for i, chain in enumerate(chains):
        t = sn.trees.get(chain)  # each built from the cached tree below plus one index
        assert open(t.lookup("overwriteme").src, "rb").read() == (f"{i} WAS HERE!\n".encode() if i else b"FIRST!\n")
        assert sorted(t.lookup("addhere").kids) == sorted(f"file-{j}".encode() for j in range(1, i + 1))
        assert list(t.lookup("onlyme").kids) == [f"file-{i}".encode() if i else b"bottom"]
    assert sn.trees.built_layers == n
    # ...and real mounts of a sample of them against a flat directory
    appliers = layer_appliers(n + 1)
    flat = work / "flat"
    flat.mkdir()
    samples = set(range(0, n, 25)) | {1, 127, 498, 499}
    for i in range(n):
        appliers[i](flat)
        if i not in samples:
            continue
        key = f"view-{i}"
        sn.view(key, chains[i])  # an imported layer is a committed snapshot named by its chainID
        with Mounted(sn, key, work / key) as mp:
            assert_same_tree(flat, mp)
        sn.remove(key)
    # work on top of the 500-layer chain: layer 501, committed and viewed again
    sn.prepare("top", chains[-1])
    with Mounted(sn, "top", work / "top") as mp:
        appliers[n](mp)
        appliers[n](flat)
        assert_same_tree(flat, mp)
    info = sn.commit("layer-501", "top")
    assert len(sn.chain_of("layer-501")) == n + 1
    sn.view("v501", "layer-501")
    with Mounted(sn, "v501", work / "v501") as mp:
        assert_same_tree(flat, mp)
        assert sorted(os.listdir(mp / "onlyme")) == [f"file-{n}"]
        assert len(os.listdir(mp / "addhere")) == n
    assert info.chain_id == sn.stat("layer-501").chain_id


def test_lower_tree_is_cached_per_chain(env):
    sn, work = env
    chains = import_chain(sn, 100)
    top = chains[-1]
    sn.view("v1", top)
    flat = work / "flat"
    flat.mkdir()
    for a in layer_appliers(100):
        a(flat)
    with Mounted(sn, "v1", work / "v1") as mp:
        assert_same_tree(flat, mp)
    assert sn.trees.built_layers == 100
    assert sn.trees.cached(top)

    # a fresh process-level view of the store: the tree comes from the cache, no index is read
    fresh = TreeCache(sn.root / "cache" / "lowertrees", sn.store)
    tree = fresh.get(top)
    assert fresh.built_layers == 0
    assert sorted(tree.lookup("onlyme").kids) == [b"file-99"]
    # one more layer: built from the cached parent plus one index
    child = sn.store.import_tar(io.BytesIO(layer_tar(100)), top).chain_id
    fresh.get(child)
    assert fresh.built_layers == 1
    # mounting the chain again (new Snapshotter, as a new CLI process would) reads no index
    sn2 = Snapshotter(sn.root)
    sn2.view("v2", top)
    with Mounted(sn2, "v2", work / "v2") as mp:
        assert_same_tree(flat, mp)
    assert sn2.trees.built_layers == 0
    sn2.close()
    # cleanup drops cached trees of removed chains only
    sn.store.remove(child)
    removed = sn.cleanup()
    assert any(r.endswith(child.split(":")[1]) for r in removed)
    assert sn.trees.cached(top)
    shutil.rmtree(work / "flat")
