"""Access record files (read, written, summarized; bad lines named) and the member reordering
optimize does (what a moved file brings along, what stays, landmarks, bytes kept)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from fusesnap.errors import InvalidInput
from fusesnap.images import layerorder
from fusesnap.snapshots.accessrecord import RecordEntry, dump, first_accesses, layer_order, load, summarize
from tarbuild import TarBuilder

A, B, C = ("sha256:" + c * 64 for c in "abc")


def test_a_record_round_trips_with_names_that_are_not_utf8(tmp_path: Path) -> None:
    odd = b"lib/caf\xe9.so".decode("utf-8", "surrogateescape")
    entries = [RecordEntry("bin/sh", 0, A, 100), RecordEntry(odd, 1, B, 7), RecordEntry("tmp/new", 2, None, 0)]
    dump(tmp_path / "r.jsonl", entries)
    assert b"caf\xe9" in (tmp_path / "r.jsonl").read_bytes()
    assert load(tmp_path / "r.jsonl") == entries
    s = summarize(entries)
    assert (s["files"], s["bytes"]) == (3, 107)
    assert [(r["layer_index"], r["files"], r["bytes"]) for r in s["layers"]] == [(0, 1, 100), (1, 1, 7), (2, 1, 0)]


@pytest.mark.parametrize("line, words", [
    (b"not json", "line 2: not JSON"),
    (b"[1, 2]", "line 2: not a JSON object"),
    (b'{"path": "", "layer_index": 0, "chain_id": null, "size": 1}', '"path"'),
    (b'{"path": "a/../../etc/shadow", "layer_index": 0, "chain_id": null, "size": 1}', "'..'"),
    (b'{"path": "a", "layer_index": "0", "chain_id": null, "size": 1}', '"layer_index"'),
    (b'{"path": "a", "layer_index": 0, "chain_id": "md5:x", "size": 1}', '"chain_id"'),
    (b'{"path": "a", "layer_index": 0, "chain_id": null, "size": -1}', '"size"'),
])
def test_a_bad_line_is_named(tmp_path: Path, line: bytes, words: str) -> None:
    good = b'{"path": "./bin//sh", "layer_index": 0, "chain_id": null, "size": 1}\n'
    (tmp_path / "r.jsonl").write_bytes(good + line + b"\n")
    with pytest.raises(InvalidInput) as e:
        load(tmp_path / "r.jsonl")
    assert words in str(e.value) and "r.jsonl" in str(e.value)
    (tmp_path / "r.jsonl").write_bytes(good + b"\n")
    assert load(tmp_path / "r.jsonl") == [RecordEntry("bin/sh", 0, None, 1)]     # normalized


def test_layer_order_follows_first_reads_by_chain_id_then_position() -> None:
    rec = [RecordEntry("x", 2, C, 1), RecordEntry("made", 3, None, 1), RecordEntry("y", 0, A, 1),
           RecordEntry("z", 2, C, 1)]
    assert layer_order(rec, [A, B, C]) == [2, 0]
    assert layer_order(rec, ["sha256:" + "d" * 64, B, "sha256:" + "e" * 64]) == [2, 0]   # another build
    plain = [RecordEntry("x", 1, None, 1), RecordEntry("y", 0, None, 1)]             # plain directories
    assert layer_order(plain, [A, B]) == [1, 0]
    assert [e.path for e in first_accesses(rec + [RecordEntry("x", 2, C, 1)])] == ["x", "made", "y", "z"]


def _tar() -> bytes:
    tb = TarBuilder()
    tb.add("etc").add("etc/motd", b"hello\n").add("etc/.wh.old", b"")
    tb.add("usr").add("usr/lib").add("usr/lib/.wh..wh..opq", b"").add("usr/lib/libx.so", b"X" * 700)
    tb.add("usr/lib/liby.so", kind=tarfile.LNKTYPE, link="usr/lib/libx.so")
    tb.add("bin").add("bin/dup", b"first\n").add("bin/dup", b"second\n").add("bin/sh", b"#!sh\n")
    tb.add(".prefetch.landmark", b"\x0f")                                              # from an earlier run
    tb.add("etc/old", b"new file where a lower one was deleted\n")
    return tb.data()


def _members(data: bytes) -> list[tuple[str, bytes | None]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m.name, tf.extractfile(m).read() if m.isreg() else m.linkname.encode())
                for m in tf.getmembers()]


def test_reorder_moves_files_with_what_they_need_and_keeps_every_member(tmp_path: Path) -> None:
    src = tmp_path / "in.tar"
    src.write_bytes(_tar())
    with open(src, "rb") as f:
        spans = layerorder.scan(f, "test layer")
        plan = layerorder.reorder(spans, [b"usr/lib/liby.so", b"etc/old", b"bin/dup", b"nothere"])
        out = io.BytesIO()
        diff_id = layerorder.write(f, spans, plan.order, out)
    assert plan.moved == [b"usr/lib/liby.so", b"etc/old"] and plan.stuck == [b"bin/dup", b"nothere"]
    got = _members(out.getvalue())
    assert [n for n, _ in got] == [
        "usr", "usr/lib", "usr/lib/.wh..wh..opq",          # the parents, the opaque marker after its dir
        "usr/lib/libx.so", "usr/lib/liby.so",               # a hard link's target before the link
        "etc", "etc/.wh.old", "etc/old",                    # a whiteout of the same name before the file
        ".prefetch.landmark",
        "etc/motd", "bin", "bin/dup", "bin/dup", "bin/sh"]  # the rest in order; the old landmark dropped
    before = sorted(m for m in _members(_tar()) if m[0] != ".prefetch.landmark")
    assert sorted(m for m in got if m[0] != ".prefetch.landmark") == before
    assert dict(got)[".prefetch.landmark"] == b"\x0f"
    assert diff_id == "sha256:" + hashlib.sha256(out.getvalue()).hexdigest()
    # nothing recorded in a layer: it starts with the no-prefetch landmark
    with open(src, "rb") as f:
        plan = layerorder.reorder(spans, [])
        out = io.BytesIO()
        layerorder.write(f, spans, plan.order, out)
    assert [n for n, _ in _members(out.getvalue())][:2] == [".no.prefetch.landmark", "etc"]


def test_a_global_header_that_sets_fields_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"uid": "7"}) as tf:
        ti = tarfile.TarInfo("a")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"a"))
    with pytest.raises(InvalidInput, match="layer 3: a PAX global header sets uid"):
        layerorder.scan(io.BytesIO(buf.getvalue()), "layer 3")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "v1"}) as tf:
        tf.addfile(tarfile.TarInfo("b"))
    assert [s.name for s in layerorder.scan(io.BytesIO(buf.getvalue()), "layer 4")] == [b"b"]
