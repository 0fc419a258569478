"""Snapshot lifecycle without mounts: containerd's metadata behaviours, commit into the store, CLI contract.

Changes are written straight into the active snapshot's upper dir here; the
conformance tests (test_snapshotter_conformance.py) do the same through real mounts.
"""

import hashlib
import io
import json
import os
import subprocess
import tarfile
import time

import pytest

from fusesnap.errors import AlreadyExists, InUse, InvalidInput, NotFound
from fusesnap.snapshots.snapshotter import Info, Snapshotter
from helpers import script

GC = "containerd.io/gc.root"


@pytest.fixture
def sn(tmp_path):
    s = Snapshotter(tmp_path / "root")
    yield s
    s.close()


def write(sn, key, rel, data=b"x", mtime=1_600_000_000):
    p = sn.upper_dir(key) / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.utime(p, (mtime, mtime))
    return p


def layer_tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1_600_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_stat_active_committed_and_transitivity(sn):
    sn.prepare("preparing")
    a = sn.stat("preparing")
    assert (a.name, a.kind, a.parent) == ("preparing", "active", "")
    ca = sn.commit("snapA", "preparing")
    assert (ca.kind, ca.parent) == ("committed", "")
    assert ca.chain_id and ca.chain_id.startswith("sha256:")
    with pytest.raises(NotFound):
        sn.stat("preparing")
    sn.prepare("next", "snapA")
    write(sn, "next", "foo", b"foo bar\n")
    assert sn.stat("next").parent == "snapA"
    cb = sn.commit("snapB", "next")
    assert cb.parent == "snapA"
    assert sn.stat(cb.parent).parent == ""
    assert sn.store.get(cb.chain_id).parent == ca.chain_id


def test_duplicate_keys_are_refused_for_prepare_and_view(sn):
    sn.prepare("p")
    sn.commit("snapA", "p")
    sn.prepare("newlayer", "snapA")
    with pytest.raises(AlreadyExists):
        sn.view("newlayer", "snapA")
    sn.prepare("prepLayer", "snapA")
    with pytest.raises(AlreadyExists):
        sn.prepare("prepLayer", "snapA")
    sn.view("viewLayer", "snapA")
    with pytest.raises(AlreadyExists):
        sn.view("viewLayer", "snapA")
    with pytest.raises(AlreadyExists):
        sn.prepare("snapA")
    with pytest.raises(InvalidInput):
        sn.prepare("x", "newlayer")  # parents must be committed
    with pytest.raises(NotFound):
        sn.prepare("y", "no-such-parent")


def base_snapshots(sn):
    labels = {GC: "now"}
    sn.prepare("c1-a", "", labels)
    sn.commit("c1", "c1-a", labels)
    sn.prepare("c2-a", "c1", labels)
    sn.commit("c2", "c2-a", labels)
    sn.prepare("a1", "c2", labels)
    sn.prepare("a2", "", labels)
    sn.view("v1", "c2", labels)
    sn.view("v2", "", labels)


def test_update_labels_and_timestamps(sn):
    t1 = time.time_ns()
    base_snapshots(sn)
    t2 = time.time_ns()
    cases = [("c1", "committed", ""), ("c2", "committed", "c1"), ("a1", "active", "c2"),
             ("a2", "active", ""), ("v1", "view", "c2"), ("v2", "view", "")]
    for name, kind, parent in cases:
        st = sn.stat(name)
        assert t1 <= st.created <= t2 and st.created == st.updated
        assert (st.kind, st.parent, st.name) == (kind, parent, name)
        created = st.created
        expected = {"l1": "v1", "l2": "v2", "l3": "v3", GC: "root"}
        u1 = time.time_ns()
        st = sn.update(Info(name, kind, "doesnotexist", dict(expected)))
        u2 = time.time_ns()
        assert st.created == created and u1 <= st.updated <= u2
        assert (st.kind, st.parent) == (kind, parent)
        assert st.labels == expected
        st = sn.update(Info(name, kind, parent, {"l1": "updated", "l4": "v4"}), "labels.l1", "labels.l2")
        assert st.labels == {"l1": "updated", "l3": "v3", GC: "root"}
        st = sn.update(Info(name, kind, parent, {"l4": "v4", GC: "root"}), "labels")
        assert st.labels == {"l4": "v4", GC: "root"}
        with pytest.raises(InvalidInput):
            sn.update(Info(name, kind, "doesnotexist", {}), "parent")
        assert sn.stat(name).parent == parent


def test_remove_and_key_reuse(sn):
    sn.prepare("committed-a")
    sn.commit("committed-1", "committed-a")
    sn.prepare("reuse-1", "committed-1")
    sn.remove("reuse-1")
    sn.view("reuse-1", "committed-1")
    sn.remove("reuse-1")
    sn.prepare("reuse-1")
    sn.remove("committed-1")
    sn.commit("committed-1", "reuse-1")
    assert sn.stat("committed-1").kind == "committed"


def test_remove_intermediate_is_refused_top_down_works(sn):
    sn.prepare("base")
    sn.commit("committed-base", "base")
    sn.prepare("intermediate", "committed-base")
    write(sn, "intermediate", "f")
    sn.commit("committed-inter", "intermediate")
    sn.prepare("toplayer", "committed-inter")
    with pytest.raises(InUse, match="remove"):
        sn.remove("committed-inter")
    inter_chain = sn.stat("committed-inter").chain_id
    sn.remove("toplayer")
    sn.remove("committed-inter")
    sn.remove("committed-base")
    # the layers went with their last names
    assert not sn.store.exists(inter_chain)


def test_walk_filters_and_stat_in_walk(sn):
    gc = {GC: "check-walk"}
    sn.prepare("a-np", "", gc)
    sn.prepare("p-tmp", "", gc)
    sn.commit("p", "p-tmp", gc)
    sn.prepare("a", "p", gc)
    sn.view("v", "p", gc)
    sn.prepare("p-wl-tmp", "", gc)
    sn.commit("p-wl", "p-wl-tmp", {"l": "1", **gc})
    sn.prepare("a-wl", "p-wl", {"l": "2", **gc})
    sn.view("v-wl", "p-wl", {"l": "3", **gc})
    sn.prepare("a-np-wl", "", {"l": "2", **gc})

    def names(*filters):
        got = []
        sn.walk(lambda i: got.append(i.name), *filters)
        return sorted(got)

    q = 'labels."containerd.io/gc.root"==check-walk'
    assert names(q) == sorted(["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"])
    assert names("kind==active," + q) == sorted(["a-np", "a", "a-wl", "a-np-wl"])
    assert names("kind==view," + q) == ["v", "v-wl"]
    assert names("kind==committed," + q) == ["p", "p-wl"]
    assert names("name==p", "name==a-np-wl") == ["a-np-wl", "p"]
    assert names("name==a-wl,labels.l") == ["a-wl"]
    assert names("parent==p") == ["a", "v"]
    assert names('parent!="",' + q) == sorted(["a", "v", "a-wl", "v-wl"])
    assert names("labels.l") == sorted(["p-wl", "a-wl", "v-wl", "a-np-wl"])
    assert names("labels.l==2") == ["a-np-wl", "a-wl"]
    # p and p-wl are the same empty layer: both names stay, removing one keeps the layer
    assert sn.stat("p").chain_id == sn.stat("p-wl").chain_id

    seen = []

    def check(info):
        again = sn.stat(info.name)  # re-entrant: no lock held during the callback
        assert again == info
        seen.append(info.name)

    sn.walk(check)
    assert "a-np-wl" in seen


def test_close_twice(tmp_path):
    s = Snapshotter(tmp_path / "r")
    s.prepare("closeTwice-prepare")
    s.commit("closeTwice", "closeTwice-prepare")
    s.remove("closeTwice")
    s.close()
    s.close()


def test_commit_stores_the_changeset_and_moves_upper_files(sn):
    sn.prepare("k")
    snap_dir = sn.upper_dir("k").parent
    big = write(sn, "k", "dir/big", os.urandom(300_000))
    ino = os.stat(big).st_ino
    write(sn, "k", "dir/small", b"hello")
    os.utime(sn.upper_dir("k") / "dir", (1_600_000_000, 1_600_000_000))
    buf = io.BytesIO()
    diff_id = sn.diff("k", buf)
    assert diff_id == "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()
    info = sn.commit("layer1", "k")
    li = sn.store.get(info.chain_id)
    assert li.diff_id == diff_id
    # export reproduces the committed changeset byte for byte, by name as well as by chainID
    for ref in (info.chain_id, "layer1"):
        out = io.BytesIO()
        sn.store.export(ref, out)
        assert out.getvalue() == buf.getvalue()
    # the upper's file was moved into the layer, not copied
    moved = sn.store.fs_dir(info.chain_id)
    inos = {os.stat(os.path.join(d, f)).st_ino for d, _, fs in os.walk(moved) for f in fs}
    assert ino in inos
    assert not snap_dir.exists()  # the active snapshot's directory went away with it


def test_same_changes_twice_give_the_same_diff_id(sn):
    chains = []
    for i in range(2):
        sn.prepare(f"k{i}")
        write(sn, f"k{i}", "etc/hosts", b"10.0.0.1 x\n")
        os.utime(sn.upper_dir(f"k{i}") / "etc", (1_600_000_000, 1_600_000_000))
        chains.append(sn.commit(f"n{i}", f"k{i}").chain_id)
    assert chains[0] == chains[1]
    sn.remove("n0")
    assert sn.store.exists(chains[0])  # still named n1
    sn.remove("n1")
    assert not sn.store.exists(chains[0])


def test_imported_layers_are_committed_snapshots_named_by_chain_id(sn):
    li = sn.store.import_tar(io.BytesIO(layer_tar([("etc/os-release", b"ID=test\n")])))
    info = sn.stat(li.chain_id)
    assert (info.kind, info.name, info.chain_id, info.parent) == ("committed", li.chain_id, li.chain_id, "")
    assert li.chain_id in [i.name for i in sn.list("kind==committed")]
    sn.prepare("on-image", li.chain_id)
    with pytest.raises(InUse, match="remove"):
        sn.remove(li.chain_id)
    write(sn, "on-image", "app", b"app")
    c = sn.commit("app", "on-image")
    assert sn.store.get(c.chain_id).parent == li.chain_id
    assert sn.stat("app").parent == li.chain_id
    u = sn.update(Info(li.chain_id, "committed", "", {"team": "x"}), "labels.team")
    assert u.labels.get("team") == "x" and u.updated > u.created
    u = sn.update(Info(li.chain_id, "committed", "", {"only": "this"}), "labels")
    assert u.labels == {"only": "this"}
    assert sn.store.get(li.chain_id).labels == {"only": "this"}
    # layer references the store understands work as parents too; the parent is the chainID
    sn.store.set_labels(li.chain_id, {"fusesnap.io/name": "base-image"})
    sn.view("by-name", "base-image")
    sn.view("by-prefix", li.chain_id[7:7 + 16])
    assert sn.stat("by-name").parent == sn.stat("by-prefix").parent == li.chain_id
    sn.remove("by-name")
    sn.remove("by-prefix")
    sn.remove("app")
    sn.remove(li.chain_id)
    with pytest.raises(NotFound):
        sn.stat(li.chain_id)


def test_usage_counts_upper_bytes_and_inodes(sn):
    sn.prepare("u")
    assert sn.usage("u").inodes == 0
    write(sn, "u", "a/b", b"x" * 10000)
    u = sn.usage("u")
    assert u.inodes == 2 and u.size >= 10000
    c = sn.commit("uc", "u")
    cu = sn.usage("uc")
    assert cu.inodes >= 2 and cu.size >= 10000
    assert c.kind == "committed"


def test_cleanup_removes_orphaned_snapshot_dirs(sn):
    sn.prepare("keep")
    orphan = sn.snapshots_dir / "9999"
    (orphan / "upper").mkdir(parents=True)
    (orphan / "upper" / "f").write_bytes(b"x")
    removed = sn.cleanup()
    assert str(orphan) in removed and not orphan.exists()
    assert sn.upper_dir("keep").exists()


def run(root, *args, input=None):
    return subprocess.run([script("fusesnap"), "--root", str(root), *args], capture_output=True, input=input)


def test_cli_contract(tmp_path):
    root = tmp_path / "root"
    assert run(root, "prepare", "k1").returncode == 0
    with Snapshotter(root) as s:
        write(s, "k1", "hello", b"hi\n")
    d = run(root, "diff", "k1")
    assert d.returncode == 0 and d.stderr.decode().strip().startswith("sha256:")
    c = run(root, "commit", "base", "k1", "--label", "a=b")
    assert c.returncode == 0, c.stderr
    chain = c.stdout.decode().splitlines()[0]
    assert chain == "sha256:" + hashlib.sha256(d.stdout).hexdigest()  # single layer: chainID == diffID
    e = run(root, "export", "base")
    assert e.returncode == 0 and e.stdout == d.stdout
    st = json.loads(run(root, "stat", "--json", "base").stdout)
    assert {"name", "kind", "parent", "labels", "created", "updated", "chain_id"} <= set(st)
    assert (st["kind"], st["chain_id"], st["labels"]) == ("committed", chain, {"a": "b"})
    assert run(root, "prepare", "k2", "base").returncode == 0
    assert run(root, "view", "v2", "base").returncode == 0
    dup = run(root, "view", "v2", "base")
    assert dup.returncode != 0 and len(dup.stderr.decode().strip().splitlines()) == 1
    ls = json.loads(run(root, "list", "--json", "parent==base").stdout)
    assert sorted(i["name"] for i in ls) == ["k2", "v2"]
    assert all("chain_id" not in i for i in ls)
    assert json.loads(run(root, "--json", "list", "kind==view").stdout)[0]["name"] == "v2"
    up = run(root, "update", "k2", "--label", "x=1", "--json")
    assert json.loads(up.stdout)["labels"] == {"x": "1"}
    bad = run(root, "update", "k2", "--parent", "other")
    assert bad.returncode != 0 and b"only labels" in bad.stderr
    rm = run(root, "remove", "base")
    assert rm.returncode != 0 and b"remove" in rm.stderr
    m = json.loads(run(root, "mounts", "k2").stdout)
    assert m[0]["type"] == "fuse3.fusesnap" and "rw" in m[0]["options"]
    us = json.loads(run(root, "usage", "--json", "k2").stdout)
    assert us == {"size": 0, "inodes": 0}
    badf = run(root, "list", 'labels."x')
    assert badf.returncode != 0 and b"invalid filter" in badf.stderr
    assert run(root, "remove", "k2", "v2", "base").returncode == 0
    assert json.loads(run(root, "list", "--json").stdout) == []
    assert run(root, "cleanup").returncode == 0


@pytest.mark.parametrize("point", ["staged", "after-rename"])
def test_commit_killed_mid_import_loses_nothing(tmp_path, point):
    root = tmp_path / "root"
    with Snapshotter(root) as s:
        s.prepare("k")
        write(s, "k", "a/shared", b"data" * 5000)
        os.chmod(write(s, "k", "a/private", b"secret"), 0o600)
        os.link(s.upper_dir("k") / "a" / "shared", s.upper_dir("k") / "a" / "link")
        os.utime(s.upper_dir("k") / "a", (1_600_000_000, 1_600_000_000))
        before = io.BytesIO()
        s.diff("k", before)
    env = dict(os.environ, FUSESNAP_CRASH_AT=point)
    r = subprocess.run([script("fusesnap"), "--root", str(root), "commit", "c", "k"], env=env, capture_output=True)
    assert r.returncode != 0  # killed
    with Snapshotter(root) as s:
        assert s.stat("k").kind == "active"
        again = io.BytesIO()
        s.diff("k", again)
        assert again.getvalue() == before.getvalue()  # the upper is whole
        ino = os.stat(s.upper_dir("k") / "a" / "shared").st_ino
        info = s.commit("c", "k")
        # donated again (not copied) despite the links the killed commit left in its spool
        assert os.stat(s.store.fs_dir(info.chain_id) / "a" / "shared").st_ino == ino
        out = io.BytesIO()
        s.store.export("c", out)
        assert out.getvalue() == before.getvalue()
        assert info.chain_id == "sha256:" + hashlib.sha256(before.getvalue()).hexdigest()


def test_failed_import_restores_the_upper(sn, monkeypatch):
    sn.prepare("k")
    f = write(sn, "k", "f", b"x" * 1000)
    before = io.BytesIO()
    sn.diff("k", before)
    real = sn.store.stage_tar

    def failing(src, parent=None, *, donor=None):
        assert donor is not None and donor(b"f")  # the store would take this file...
        raise OSError(28, "No space left on device")  # ...and then fail

    monkeypatch.setattr(sn.store, "stage_tar", failing)
    with pytest.raises(OSError):
        sn.commit("c", "k")
    monkeypatch.setattr(sn.store, "stage_tar", real)
    assert f.read_bytes() == b"x" * 1000 and sn.stat("k").kind == "active"
    again = io.BytesIO()
    sn.diff("k", again)
    assert again.getvalue() == before.getvalue()
    assert sn.commit("c", "k").kind == "committed"


def test_every_committed_name_resolves_to_its_layer(sn):
    from fusesnap.snapshots.names import chain_of_name

    for key, name in (("k1", "first"), ("k2", "second")):
        sn.prepare(key)
        sn.commit(name, key)  # both empty: one layer, two names
    chain = sn.stat("first").chain_id
    assert chain_of_name(sn.root, "first") == chain_of_name(sn.root, "second") == chain
    assert chain_of_name(sn.root, "nope") is None
    assert chain_of_name(sn.root / "elsewhere", "first") is None
    sn.close()
    # the CLI's export and inspect accept every committed name, not only the one in the layer's label
    tars = {name: run(sn.root, "export", name).stdout for name in ("first", "second", chain)}
    assert tars["first"] == tars["second"] == tars[chain] and tars[chain]
    assert json.loads(run(sn.root, "--json", "inspect", "second").stdout)["chain_id"] == chain
    assert run(sn.root, "export", "nope").returncode != 0


def test_concurrent_prepares_of_one_key_keep_the_parent_referenced(tmp_path):
    root = tmp_path / "root"
    with Snapshotter(root) as s:  # an imported layer: nothing but the snapshot's reference pins it
        chain = s.store.import_tar(io.BytesIO(layer_tar([("f", b"base")]))).chain_id
    procs = [subprocess.Popen([script("fusesnap"), "--root", str(root), "prepare", "same", chain],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(5)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1, 1, 1, 1]
    assert all(b"already exists" in err for rc, err in results if rc)
    with Snapshotter(root) as s:
        # the losers dropped only their own references: the winner's still pins the layer
        with pytest.raises(InUse):
            s.store.remove(chain)
        s.remove("same")
        s.remove(chain)
        assert not s.store.exists(chain)
