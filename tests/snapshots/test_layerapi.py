"""Moby's layer-store API on fusesnap: read-only layers (sizes, metadata, tar streams) and
read-write layers (init function, mount reference count, changes, size)."""

import io
import os
import tarfile

import pytest

from fusesnap.errors import InUse, InvalidInput
from fusesnap.fs.core.lower import IndexLower
from fusesnap.fs.core.lowertree import build_lower_tree
from fusesnap.snapshots.layerapi import Change, LayerAPI
from fusesnap.snapshots.snapshotter import Snapshotter

T = 1_600_000_000


def tar_of(members) -> bytes:
    """members: (name, kind, payload-or-linkname, mode[, uid, gid])"""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            name, kind, payload, mode = m[:4]
            ti = tarfile.TarInfo(name)
            ti.mode, ti.mtime = mode, T
            if len(m) > 4:
                ti.uid, ti.gid = m[4], m[5]
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, payload
                tf.addfile(ti)
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, payload
                tf.addfile(ti)
            else:
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
    return buf.getvalue()


LAYERS = [
    [("etc", "dir", None, 0o755), ("etc/hosts", "reg", b"1\n", 0o644), ("etc/gone", "reg", b"g", 0o600),
     ("lib", "dir", None, 0o755), ("lib/a", "reg", b"a", 0o644), ("lib/b", "reg", b"b", 0o644),
     ("opt", "dir", None, 0o700), ("opt/x", "reg", b"x", 0o644), ("file-then-dir", "reg", b"f", 0o644)],
    [("etc", "dir", None, 0o755), ("etc/hosts", "reg", b"2\n", 0o600, 3, 4), ("etc/.wh.gone", "reg", b"", 0),
     ("lib", "dir", None, 0o755), ("lib/.wh..wh..opq", "reg", b"", 0), ("lib/c", "reg", b"c", 0o644),
     ("usr", "dir", None, 0o755), ("usr/bin", "reg", b"bin", 0o755), ("usr/link", "hard", "usr/bin", 0o755),
     (".wh.opt", "reg", b"", 0), (".wh.file-then-dir", "reg", b"", 0)],
    [("opt", "dir", None, 0o755), ("opt/y", "reg", b"y", 0o644), ("file-then-dir", "dir", None, 0o755),
     ("file-then-dir/z", "reg", b"z", 0o644), ("usr", "dir", None, 0o755), ("usr/sym", "sym", "bin", 0o777),
     ("usr/.wh.link", "reg", b"", 0)],
]


def dump(tree):
    """path -> presented attributes and content of a merged lower tree."""
    out = {}

    def walk(node, path):
        for name, n in sorted(node.kids.items()):
            p = path + b"/" + name if path else name
            if n.kids is not None:
                out[p] = ("dir", n.mode, n.uid, n.gid)
                walk(n, p)
            else:
                data = open(n.src, "rb").read() if n.src else n.target
                out[p] = ("obj", n.mode, n.uid, n.gid, data, n.nlink)
    walk(tree.root, b"")
    return out


@pytest.fixture
def api(tmp_path):
    sn = Snapshotter(tmp_path / "root")
    yield LayerAPI(sn)
    sn.close()


def register_all(api):
    layers, parent = [], None
    for members in LAYERS:
        layer = api.register(io.BytesIO(tar_of(members)), parent)
        layers.append(layer)
        parent = layer.chain_id
    return layers


def tree_of(api, chain):
    st = api.store
    return build_lower_tree([IndexLower(st.entries(c), st.fs_dir(c)) for c in reversed(chain)])


def test_sizes_metadata_and_tar_stream(api):
    l1, l2, l3 = register_all(api)
    assert l3.parent() == l2 and l1.parent() is None
    assert l1.diff_size() == len(b"1\n") + 1 + 1 + 1 + 1 + 1
    assert l3.size() == l1.diff_size() + l2.diff_size() + l3.diff_size()
    md = l2.metadata()
    assert md["ChainID"] == l2.chain_id and md["Parent"] == l1.chain_id and os.path.isdir(md["LayerDir"])
    buf = io.BytesIO()
    l2.tar_stream(buf)
    assert buf.getvalue() == tar_of(LAYERS[1])
    assert set(api.map()) == {l1.chain_id, l2.chain_id, l3.chain_id}


@pytest.mark.parametrize("ancestor_index", [None, 0, 1])
def test_tar_stream_from_ancestor_squashes_the_layers_above(api, ancestor_index):
    layers = register_all(api)
    top = layers[-1]
    ancestor = layers[ancestor_index].chain_id if ancestor_index is not None else None
    buf = io.BytesIO()
    top.tar_stream_from(ancestor, buf)
    # applying the squashed tar on the ancestor gives the same merged tree as the real chain
    squashed = api.store.import_tar(io.BytesIO(buf.getvalue()), ancestor)
    expected = dump(tree_of(api, api.store.chain(top.chain_id)))
    got = dump(tree_of(api, api.store.chain(squashed.chain_id)))
    assert got == expected
    assert got[b"usr/bin"][5] == 1  # the hard link deleted in layer 3 is gone in both
    # deterministic
    again = io.BytesIO()
    top.tar_stream_from(ancestor, again)
    assert again.getvalue() == buf.getvalue()


def test_tar_stream_from_refuses_a_non_ancestor(api):
    l1, l2, l3 = register_all(api)
    other = api.register(io.BytesIO(tar_of([("o", "reg", b"o", 0o644)])))
    with pytest.raises(InvalidInput, match="not an ancestor"):
        l3.tar_stream_from(other.chain_id, io.BytesIO())
    empty = io.BytesIO()
    l3.tar_stream_from(l3.chain_id, empty)
    assert empty.getvalue() == b"\0" * 1024


def test_release_removes_unreferenced_layers_up_the_chain(api):
    l1, l2, l3 = register_all(api)
    assert api.release(l3) == [l3.chain_id]
    assert api.release(l1) == []  # l2 still builds on it
    assert api.release(l2) == [l2.chain_id, l1.chain_id]
    assert api.store.list() == []
    with pytest.raises(InvalidInput):
        api.release(l2)


# -- read-write layers (real mounts) -------------------------------------------------------------


@pytest.fixture
def rw_api(shared_tmp):
    sn = Snapshotter(shared_tmp / "root")
    yield LayerAPI(sn, shared_tmp / "mnt")
    sn.close()


def test_rw_layer_init_mount_refcount_changes_size(rw_api):
    api = rw_api
    base = register_all(api)[-1]

    def init(root):
        (root / "etc" / "resolv.conf").write_bytes(b"nameserver 10.0.0.1\n")
        (root / "dev").mkdir()

    rw = api.create_rw_layer("ctr", base.chain_id, init_func=init)
    assert rw.parent() == base and rw.init_name == "ctr-init"
    assert rw.changes() == [] and rw.size() == 0

    mp = rw.mount()
    assert rw.mount() == mp and rw.mount_count == 2  # mount twice: one FUSE mount, two users
    assert (mp / "etc" / "resolv.conf").read_bytes() == b"nameserver 10.0.0.1\n"  # init layer below
    (mp / "etc" / "hosts").write_bytes(b"3\n")          # modify a lower file
    (mp / "new").write_bytes(b"12345")                  # add
    (mp / "lib" / "c").unlink()                         # delete
    (mp / "etc" / "resolv.conf").unlink()               # delete a file of the init layer
    (mp / "opt" / "sub").mkdir()                        # add inside a lower dir
    assert rw.metadata()["MergedDir"] == str(mp)
    rw.unmount()
    assert (mp / "new").exists() and rw.mount_count == 1  # still mounted for the other user
    with pytest.raises(InUse):
        api.release_rw_layer(rw)
    rw.unmount()
    assert rw.mount_count == 0 and not (mp / "new").exists()
    with pytest.raises(InvalidInput):
        rw.unmount()

    ch = rw.changes()
    dirs = {"/etc", "/lib", "/opt"}  # parents: reported only when their own attributes changed
    assert [c for c in ch if c.path not in dirs] == sorted([
        Change("/etc/hosts", "C"), Change("/etc/resolv.conf", "D"), Change("/lib/c", "D"),
        Change("/new", "A"), Change("/opt/sub", "A"),
    ])
    assert all(c.kind == "C" for c in ch if c.path in dirs)
    assert Change("/opt", "C") in ch  # a new entry changed its mtime
    assert rw.size() == len(b"3\n") + len(b"12345")
    md = rw.metadata()
    assert md["UpperDir"].endswith("upper") and md["InitLayer"] == "ctr-init"
    assert md["LowerChain"].split(":sha256:")[0].startswith("sha256:")
    # the container's changes exclude the init layer's files
    buf = io.BytesIO()
    rw.tar_stream(buf)
    names = tarfile.open(fileobj=io.BytesIO(buf.getvalue())).getnames()
    assert "new" in names and "etc/.wh.resolv.conf" in names and "dev" not in names

    again = api.get_rw_layer("ctr")
    assert again.init_name == "ctr-init" and again.parent() == base
    api.release_rw_layer(again)
    with pytest.raises(Exception):
        api.get_rw_layer("ctr")
    assert not api.sn.exists("ctr-init")


def test_rw_layer_opaque_dir_reports_deleted_lower_children(rw_api):
    api = rw_api
    base = register_all(api)[0]
    rw = api.create_rw_layer("c2", base.chain_id)
    assert rw.init_name is None
    mp = rw.mount()
    try:
        import shutil
        shutil.rmtree(mp / "lib")
        (mp / "lib").mkdir()
        (mp / "lib" / "z").write_bytes(b"z")
    finally:
        rw.unmount()
    ch = rw.changes()
    assert Change("/lib/a", "D") in ch and Change("/lib/b", "D") in ch and Change("/lib/z", "A") in ch
    api.release_rw_layer(rw)
