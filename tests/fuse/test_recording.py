"""A recorded mount (-o record=FILE) logs each file a workload touches once, in first-access
order, with the layer that serves it: whiteouts and opaque directories respected, files
made in the upper attributed to the upper, executed and mapped files caught."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
from pathlib import Path

from unionmount import FUSESNAP, layout, mkdir, mkfile, mkwhiteout, mount_union, scratch


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_record_lists_first_accesses_once_with_the_serving_layer() -> None:
    with scratch("fusesnap-rec-") as base:
        (l0, l1, l2), upper, work, mnt = layout(base, 3)     # l0 bottom ... l2 top
        mkfile(l0 / "etc" / "motd", b"bottom motd\n")
        mkfile(l0 / "etc" / "gone", b"deleted above\n")
        mkfile(l0 / "opq" / "hidden", b"under an opaque dir\n")
        mkfile(l0 / "bin" / "tool", b"#!/bin/sh\necho ran\n", mode=0o755)
        mkfile(l0 / "lib" / "data.bin", b"M" * 10000)
        mkfile(l1 / "etc" / "motd", b"middle motd\n")       # shadows the bottom one
        mkwhiteout(l1 / "etc" / "gone")
        mkdir(l2 / "opq")
        mkfile(l2 / "opq" / ".wh..wh..opq")
        mkfile(l2 / "opq" / "fresh", b"top\n")
        mkfile(l2 / "etc" / "empty", b"")
        rec = base / "record.jsonl"
        u = mount_union(FUSESNAP, mnt, [l2, l1, l0], upper, work, [f"record={rec}"])
        try:
            assert (mnt / "etc" / "motd").read_bytes() == b"middle motd\n"
            assert not (mnt / "etc" / "gone").exists() and not (mnt / "opq" / "hidden").exists()
            assert (mnt / "opq" / "fresh").read_bytes() == b"top\n"
            assert subprocess.run([str(mnt / "bin" / "tool")], capture_output=True).stdout == b"ran\n"
            with open(mnt / "lib" / "data.bin", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                assert m[5000:5001] == b"M"
            (mnt / "etc" / "new").write_bytes(b"made here\n")
            assert (mnt / "etc" / "empty").read_bytes() == b""
            # warm again: nothing new, nothing twice
            for rel in ("etc/motd", "opq/fresh", "lib/data.bin"):
                (mnt / rel).read_bytes()
        finally:
            u.unmount()
        got = _records(rec)
    assert [r["path"] for r in got] == ["etc/motd", "opq/fresh", "bin/tool", "lib/data.bin", "etc/new",
                                        "etc/empty"]
    by = {r["path"]: r for r in got}
    assert (by["etc/motd"]["layer_index"], by["etc/motd"]["size"]) == (1, 12)
    assert by["opq/fresh"]["layer_index"] == 2
    assert by["bin/tool"]["layer_index"] == 0 and by["lib/data.bin"]["size"] == 10000
    assert by["etc/new"]["layer_index"] == 3            # the upper: one above the top lower
    assert by["etc/empty"] == {"path": "etc/empty", "layer_index": 2, "chain_id": None, "size": 0}
    assert all(r["chain_id"] is None for r in got)      # plain directories have no chainID


def test_a_mount_without_record_writes_no_log_and_keeps_plain_handlers(tmp_path: Path) -> None:
    from fusesnap.fs.core.lowertree import lower_tree_from_dirs
    from fusesnap.fs.core.union import Union
    from fusesnap.fs.fuse.operations import Operations
    from fusesnap.fs.options import MountOptions, parse_options

    low = tmp_path / "low"
    low.mkdir()
    plain = Operations(Union(lower_tree_from_dirs([low]), None, None, MountOptions()))
    assert plain.access_log is None and "read" not in vars(plain)
    rec = tmp_path / "r.jsonl"
    recorded = Operations(Union(lower_tree_from_dirs([low]), None, None,
                                parse_options([f"lowerdir={low},record={rec}"])))
    assert recorded.access_log is not None and vars(recorded)["read"] == recorded._read_recorded
    assert rec.exists() and os.stat(rec).st_mode & 0o777 == 0o600
