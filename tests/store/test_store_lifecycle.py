"""Layer lifecycle: list/inspect/name lookup, rm refused while referenced, retain vs gc, labels, JSON output."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from storeutil import fusesnap

from fusesnap.errors import AlreadyExists, InUse, NotFound
from fusesnap.store import LayerStore


def tar_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def st(tmp_path):
    s = LayerStore(tmp_path / "root")
    yield s
    s.close()


def test_cli_import_layers_inspect_export_rm(tmp_path):
    root = tmp_path / "root"
    base, top = tar_of({"a": b"1" * 700}), tar_of({"b": b"2" * 900})
    r = fusesnap(root, "import", "--name", "base-layer", "-", input=base)
    assert r.returncode == 0, r.stderr
    base_chain, base_diff = r.stdout.decode().split()
    assert base_chain == base_diff
    r = fusesnap(root, "--json", "import", "--parent", "base-layer", "-", input=top)
    info = json.loads(r.stdout)
    assert info["parent"] == base_chain and info["chain_id"] != info["diff_id"]
    assert info["size"] == 700 + 900 and info["diff_size"] == 900
    listing = json.loads(fusesnap(root, "--json", "layers").stdout)
    assert {i["chain_id"] for i in listing} == {base_chain, info["chain_id"]}
    human = fusesnap(root, "layers").stdout.decode()
    assert base_chain[7:19] in human and "base-layer" in human
    shown = json.loads(fusesnap(root, "--json", "inspect", "base-layer").stdout)
    assert shown["chain_id"] == base_chain and shown["refcount"] == 1
    assert json.loads(fusesnap(root, "--json", "inspect", info["chain_id"][7:20]).stdout)["chain"] == \
        [base_chain, info["chain_id"]]
    out = tmp_path / "out.tar"
    assert fusesnap(root, "export", "base-layer", "-o", str(out)).returncode == 0
    assert out.read_bytes() == base
    assert fusesnap(root, "export", info["chain_id"]).stdout == top
    r = fusesnap(root, "rm", base_chain)
    assert r.returncode == 1 and b"parent of" in r.stderr and r.stderr.count(b"\n") == 1
    assert fusesnap(root, "rm", info["chain_id"]).returncode == 0
    assert fusesnap(root, "rm", "base-layer").returncode == 0
    assert json.loads(fusesnap(root, "--json", "layers").stdout) == []
    assert os.listdir(root / "layers") == [] and os.listdir(root / "trash") == []
    r = fusesnap(root, "inspect", "nope")
    assert r.returncode == 1 and r.stderr == b"fusesnap: error: no such layer: nope\n"


def test_refs_retains_and_gc(st):
    a = st.import_tar(io.BytesIO(tar_of({"a": b"a"})))
    b = st.import_tar(io.BytesIO(tar_of({"b": b"b"})), parent=a.chain_id)
    c = st.import_tar(io.BytesIO(tar_of({"c": b"c"})), labels={"fusesnap.io/gc.root": "true"})
    st.retain(b.chain_id, "pull-1")
    assert st.get(b.chain_id).refcount == 1 and st.get(a.chain_id).refcount == 1
    assert st.gc() == []
    with pytest.raises(InUse):
        st.remove(b.chain_id)
    st.release(b.chain_id, "pull-1")
    with pytest.raises(NotFound):
        st.release(b.chain_id, "pull-1")
    st.add_ref(a.chain_id, "snapshot:x")
    assert st.gc() == [b.chain_id]  # a is still referenced, c is a gc root
    st.drop_ref(a.chain_id, "snapshot:x")
    assert st.gc() == [a.chain_id]
    assert [i.chain_id for i in st.list()] == [c.chain_id]
    assert sorted(os.listdir(st.root / "layers")) == [c.chain_id[7:]]


def test_labels_and_name_lookup(st):
    a = st.import_tar(io.BytesIO(tar_of({"a": b"a"})))
    b = st.import_tar(io.BytesIO(tar_of({"b": b"b"})))
    st.set_labels(a.chain_id, {"fusesnap.io/name": "committed-x", "k": "v"})
    assert st.get("committed-x").chain_id == a.chain_id
    assert st.get("committed-x").labels == {"fusesnap.io/name": "committed-x", "k": "v"}
    with pytest.raises(AlreadyExists):
        st.set_labels(b.chain_id, {"fusesnap.io/name": "committed-x"})
    st.set_labels(a.chain_id, {"k": ""})
    assert st.get(a.chain_id).labels == {"fusesnap.io/name": "committed-x"}
    out = io.BytesIO()
    st.export("committed-x", out)
    assert out.getvalue() == tar_of({"a": b"a"})
    with pytest.raises(NotFound):
        st.get("sha256:" + "f" * 64)


def test_reimport_with_labels_is_a_noop_that_adds_labels(st):
    data = tar_of({"x": b"x" * 10})
    a = st.import_tar(io.BytesIO(data))
    again = st.import_tar(io.BytesIO(data), labels={"fusesnap.io/name": "n"})
    assert again.chain_id == a.chain_id and again.created == a.created
    assert again.labels == {"fusesnap.io/name": "n"}
    assert len(os.listdir(st.root / "layers")) == 1 and os.listdir(st.root / "staging") == []


def test_donor_files_are_moved_not_copied(st, tmp_path):
    donor_dir = tmp_path / "root" / "upper"  # same filesystem as the store
    donor_dir.mkdir()
    (donor_dir / "big").write_bytes(b"D" * 5000)
    ino = os.stat(donor_dir / "big").st_ino
    data = tar_of({"big": b"D" * 5000, "other": b"o"})
    info = st.import_tar(io.BytesIO(data), donor=lambda p: str(donor_dir / os.fsdecode(p)) if p == b"big" else None)
    fs = st.fs_dir(info.chain_id)
    assert os.stat(fs / "big").st_ino == ino and not (donor_dir / "big").exists()
    out = io.BytesIO()
    st.export(info.chain_id, out)
    assert out.getvalue() == data


def test_import_with_a_taken_name_is_refused_and_leaves_nothing(st):
    st.import_tar(io.BytesIO(tar_of({"a": b"a"})), labels={"fusesnap.io/name": "n"})
    with pytest.raises(AlreadyExists):
        st.import_tar(io.BytesIO(tar_of({"b": b"b"})), labels={"fusesnap.io/name": "n"})
    assert len(st.list()) == 1 and len(os.listdir(st.root / "layers")) == 1
    assert os.listdir(st.root / "staging") == []
    # the same layer again under its own name is the usual no-op
    assert st.import_tar(io.BytesIO(tar_of({"a": b"a"})), labels={"fusesnap.io/name": "n"}).labels["fusesnap.io/name"] == "n"


def test_cli_import_zstd_from_stdin_json(tmp_path):
    import hashlib

    import zstandard

    root = tmp_path / "root"
    plain = tar_of({"z": b"z" * 4096})
    blob = zstandard.ZstdCompressor().compress(plain)
    r = fusesnap(root, "--json", "import", "-", input=blob)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["diff_id"] == "sha256:" + hashlib.sha256(plain).hexdigest() == info["chain_id"]
    assert info["compressed_digests"] == ["sha256:" + hashlib.sha256(blob).hexdigest()]
    assert info["tar_size"] == len(plain) and info["diff_size"] == 4096
    again = fusesnap(root, "import", "-", input=blob)
    assert again.returncode == 0 and again.stdout.decode().split() == [info["chain_id"], info["diff_id"]]


def test_import_can_retain_atomically_for_a_pull(st):
    a = st.import_tar(io.BytesIO(tar_of({"a": b"a"})), retain="pull-7")
    b = st.import_tar(io.BytesIO(tar_of({"b": b"b"})), parent=a.chain_id, retain="pull-7")
    again = st.import_tar(io.BytesIO(tar_of({"a": b"a"})), retain="pull-8")  # existing layer: retained too
    assert again.refcount == 3  # child b + two retains
    assert st.gc() == []
    st.release(b.chain_id, "pull-7")
    st.release(a.chain_id, "pull-7")
    assert st.gc() == [b.chain_id]
    st.release(a.chain_id, "pull-8")
    assert st.gc() == [a.chain_id]
