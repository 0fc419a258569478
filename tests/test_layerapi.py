"""Moby's layer-store API on fusesnap: read-only layers (sizes, metadata, tar streams) and
read-write layers (init function, mount reference count, changes, size)."""

import io
import os
import tarfile

import pytest

from fusesnap.errors import InUse, InvalidInput
from fusesnap.fs.lower import IndexLower
from fusesnap.fs.lowertree import build_lower_tree
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
