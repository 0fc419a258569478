"""The Recorder API over store layers: the serving layer of each path (whiteouts, opaque
directories by marker and by xattr, char 0/0 whiteouts, hard links, symlinks), an error
naming why a path is not served, a record file in the mount's format, and the same layer
indexes as a recorded store mount logs for the same files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from fusesnap.errors import InvalidInput
from fusesnap.snapshots.accessrecord import load
from fusesnap.snapshots.recorder import (ChainView, DeletedFile, HiddenByOpaque, NotAFile, NotInAnyLayer,
                                         Recorder)
from fusesnap.store.layerstore import LayerStore
from helpers import script, unmount
from tarbuild import TarBuilder


def _layers() -> list[bytes]:
    l0 = (TarBuilder()
          .add("bin").add("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755)
          .add("etc").add("etc/motd", b"bottom\n").add("etc/gone", b"gone\n")
          .add("opq").add("opq/hidden", b"hidden\n")
          .add("xopq").add("xopq/old", b"old\n")
          .add("deldir").add("deldir/x", b"x\n")
          .add("redo").add("redo/x", b"x\n")
          .add("data").add("data/a", b"a" * 3000)
          .add("lib").add("lib/real.so", b"\x7fELF" + b"\0" * 5000)
          .add("lib/link.so", kind=tarfile.SYMTYPE, link="real.so")
          .add("abs", kind=tarfile.SYMTYPE, link="/lib")
          .add("loop1", kind=tarfile.SYMTYPE, link="loop2").add("loop2", kind=tarfile.SYMTYPE, link="loop1")
          .add("up", kind=tarfile.SYMTYPE, link="../../etc/motd")
          .data())
    l1 = (TarBuilder()
          .add("etc").add("etc/motd", b"middle motd\n").add("etc/.wh.gone", b"")
          .add("etc/motd.hard", kind=tarfile.LNKTYPE, link="etc/motd")
          .add("opq").add("opq/.wh..wh..opq", b"").add("opq/fresh", b"fresh\n")
          .add(".wh.deldir", b"").add(".wh.redo", b"")
          .add(".wh.never-was", b"")
          .data())
    l2 = (TarBuilder()
          .add("xopq", pax={"SCHILY.xattr.trusted.overlay.opaque": "y"}).add("xopq/new", b"new\n")
          .add("data").add("data/a", kind=tarfile.CHRTYPE, dev=(0, 0))
          .add("empty", b"")
          .add("redo").add("redo/new", b"new\n")            # a new directory where one was deleted
          .data())
    return [l0, l1, l2]


@pytest.fixture
def chain(tmp_path: Path) -> tuple[LayerStore, list[str]]:
    st = LayerStore(tmp_path / "root")
    parent = None
    chain = []
    for tar in _layers():
        parent = st.import_tar(io.BytesIO(tar), parent).chain_id
        chain.append(parent)
    yield st, chain
    st.close()


def test_record_returns_the_serving_layer_and_writes_the_record(chain, tmp_path: Path) -> None:
    st, ids = chain
    out = tmp_path / "rec.jsonl"
    with Recorder(st, ids[-1], out) as r:
        assert r.record("etc/motd") == 1                  # shadows the bottom one
        assert r.record("/bin/tool") == 0
        assert r.record("etc/motd.hard") == 1             # a hard link: its data's layer
        assert r.record("lib/link.so") == 0               # followed to lib/real.so
        assert r.record("abs/real.so") == 0               # an absolute symlink, from the image's root
        assert r.record("up") == 1                        # '..' stops at the root
        assert r.record("opq/fresh") == 1
        assert r.record("xopq/new") == 2
        assert r.record("empty") == 2
        assert r.record("etc/motd") == 1                  # again: recorded once
    got = load(out)
    assert [e.path for e in got] == ["etc/motd", "bin/tool", "etc/motd.hard", "lib/real.so", "opq/fresh",
                                     "xopq/new", "empty"]
    by = {e.path: e for e in got}
    assert by["etc/motd"].size == len(b"middle motd\n") and by["lib/real.so"].size == 5004
    assert all(e.chain_id == ids[e.layer_index] for e in got)
    assert os.stat(out).st_mode & 0o777 == 0o600
    with pytest.raises(InvalidInput):
        r.record("etc/motd")                             # closed


def test_paths_not_served_say_why(chain, tmp_path: Path) -> None:
    st, ids = chain
    r = Recorder(st, ids, tmp_path / "rec.jsonl")        # the chain given bottom first
    cases = [("etc/gone", DeletedFile, "whiteout in layer 1"),
             ("deldir/x", DeletedFile, "its directory deldir was deleted by a whiteout in layer 1"),
             ("redo/x", DeletedFile, "(with its directory redo) was deleted by a whiteout in layer 1"),
             ("data/a", DeletedFile, "whiteout in layer 2"),              # a char 0/0 whiteout
             ("opq/hidden", HiddenByOpaque, "is inside opq, which layer 1 made opaque"),
             ("xopq/old", HiddenByOpaque, "inside xopq, which layer 2 made opaque"),   # by xattr
             ("never-was", NotInAnyLayer, "in no layer"),                 # a whiteout of nothing
             ("nothing/here", NotInAnyLayer, "in no layer"),
             ("bin/tool/x", NotInAnyLayer, "not a directory"),
             ("loop1", NotInAnyLayer, "too many levels of symbolic links"),
             ("etc", NotAFile, "directory"),
             ("/", NotAFile, "root")]
    for path, kind, words in cases:
        with pytest.raises(kind) as e:
            r.record(path)
        assert words in str(e.value) and path.strip("/") in str(e.value), (path, str(e.value))
    r.close()
    assert load(tmp_path / "rec.jsonl") == []
    with pytest.raises(InvalidInput):
        Recorder(st, ids[:1] + ids[2:], tmp_path / "x.jsonl")        # not a chain


def test_a_recorded_store_mount_logs_the_layers_the_recorder_names(chain, shared_tmp: Path) -> None:
    st, ids = chain
    root = st.root
    for name, top in (("top", ids[-1]),):
        subprocess.run([script("fusesnap"), "--root", str(root), "view", name, top], check=True, capture_output=True)
    mnt = shared_tmp / "mnt"
    mnt.mkdir()
    rec = shared_tmp / "mount.jsonl"
    p = subprocess.run([script("fusesnap"), "--root", str(root), "mount", "--record", str(rec), "top", str(mnt)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    paths = ["etc/motd", "bin/tool", "etc/motd.hard", "lib/link.so", "opq/fresh", "xopq/new", "empty"]
    try:
        for rel in paths:
            (mnt / rel).read_bytes()
    finally:
        unmount(mnt)
    logged = [json.loads(line) for line in rec.read_text().splitlines()]
    view = ChainView(st, ids[-1])
    assert len(logged) == len(paths) - 1                   # motd.hard is motd's inode: logged once
    for e in logged:
        s = view.resolve(e["path"])
        assert (e["layer_index"], e["chain_id"], e["size"]) == (s.layer_index, s.chain_id, s.size), e
    assert [e["path"] for e in logged][:4] == ["etc/motd", "bin/tool", "lib/real.so", "opq/fresh"]
