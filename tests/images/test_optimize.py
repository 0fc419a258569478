"""`fusesnap optimize IMAGE --record FILE --name NEW`: each layer's recorded files first, in
recorded order, then `.prefetch.landmark`; every member kept byte for byte; new diffIDs, the
same merged tree through a store mount; pushed like any image and pulled back with `pull
--record`, which downloads the recorded layers first; optimizing again changes nothing. A
failure part-way removes the layers it made; bad input is one line."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path


from fusesnap.snapshots.recorder import Recorder
from fusesnap.store.layerstore import LayerStore
from helpers import unmount
from imagebuild import layer_tars, tree_of, write_layout
from storeutil import fusesnap, store_state

RECORDED = ["srv/big", "etc/motd.link", "bin/sh", "etc/app/config", "opt/data/fresh"]


def ok(root: Path, *args: str) -> str:
    p = fusesnap(root, *args)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout.decode()


def members(root: Path, chain: str) -> list[tuple]:
    """(name, type, mode, owner, mtime, link, content digest) of a layer's members, in tar order."""
    data = fusesnap(root, "export", chain).stdout
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            body = tf.extractfile(m).read() if m.isreg() else b""
            out.append((m.name, m.type, m.mode, m.uid, m.gid, m.mtime, m.linkname, m.pax_headers.get("SCHILY.xattr."),
                        hashlib.sha256(body).hexdigest()))
    return out


def merged(root: Path, image: str, mp: Path) -> tuple[dict, dict]:
    """The tree a store mount of a view of `image` shows: content, and owners/times/links."""
    key = f"view-{image}"
    ok(root, "view", key, image)
    mp.mkdir()
    ok(root, "mount", key, str(mp))
    try:
        meta = {}
        for dirpath, dirnames, filenames in os.walk(mp):
            for n in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, n))
                meta[os.path.relpath(os.path.join(dirpath, n), mp)] = (st.st_uid, st.st_gid, st.st_mtime_ns,
                                                                       st.st_nlink)
        return tree_of(mp), meta
    finally:
        unmount(mp)


def layer_chains(root: Path, image: str) -> list[str]:
    return [x["chain_id"] for x in json.loads(ok(root, "images", "inspect", image, "--json"))["layer_details"]]


def test_optimize_push_pull_back(registry, shared_tmp: Path) -> None:
    img = write_layout(shared_tmp / "layout", layer_tars("-opt"))
    root = shared_tmp / "root"
    ok(root, "pull", f"oci:{shared_tmp / 'layout'}", "--name", "demo")
    old = layer_chains(root, "demo")
    rec = shared_tmp / "rec.jsonl"
    with LayerStore(root) as st, Recorder(st, old[-1], rec) as r:
        layers = [r.record(p) for p in RECORDED]
    assert layers == [2, 1, 0, 2, 1]
    res = json.loads(ok(root, "optimize", "demo", "--record", str(rec), "--name", "demo-opt", "--json"))
    assert [x["moved"] for x in res["layer_results"]] == [1, 2, 2] and res["missing"] == []
    new = layer_chains(root, "demo-opt")
    assert new == [x["chain_id"] for x in res["layer_results"]] and new[-1] == res["top_chain"]
    diff = json.loads(ok(root, "images", "inspect", "demo-opt", "--json"))["layer_details"]
    assert not {x["diff_id"] for x in diff} & set(img.diff_ids)

    # each layer: recorded files first (after what they need), the landmark, then the rest in order
    heads = [["bin", "bin/busybox", ".prefetch.landmark"],
             ["etc", "etc/motd", "etc/motd.link", "opt", "opt/data", "opt/data/.wh..wh..opq", "opt/data/fresh",
              ".prefetch.landmark"],
             ["srv", "srv/big", "etc", "etc/app", "etc/app/config", ".prefetch.landmark"]]
    for i, (o, n) in enumerate(zip(old, new)):
        before, after = members(root, o), members(root, n)
        names = [m[0] for m in after]
        assert names[:len(heads[i])] == heads[i], (i, names)
        first = sorted((m for m in before if m[0] in heads[i]), key=lambda m: heads[i].index(m[0]))
        assert [m for m in after if m[0] != ".prefetch.landmark"] == \
            first + [m for m in before if m[0] not in heads[i]]
    # the same merged tree (the landmarks hidden), owners, times and hard links included
    assert merged(root, "demo", shared_tmp / "m1") == merged(root, "demo-opt", shared_tmp / "m2")

    # pushed verbatim; pulled back, downloading the recorded layers first (record order: 2, 1, 0)
    digest = ok(root, "push", "--plain-http", "demo-opt", registry.ref("opt/demo")).split()[0]
    assert digest == res["manifest_digest"]
    root2 = shared_tmp / "root2"
    out = json.loads(ok(root2, "pull", "--plain-http", "--jobs", "1", "--record", str(rec),
                        registry.ref("opt/demo"), "--name", "back", "--json"))
    assert out["manifest_digest"] == digest
    assert layer_chains(root2, "back") == new
    wanted = {x["digest"]: i for i, x in enumerate(json.loads(ok(root2, "images", "inspect", "back", "--json"))
                                                  ["layer_details"])}
    gets = [re.search(r"blobs/(sha256:[0-9a-f]+)", line).group(1)
            for line in registry.requests("GET", r"/v2/opt/demo/blobs/sha256:[0-9a-f]+")]
    assert [wanted[d] for d in gets if d in wanted] == [2, 1, 0]

    # optimizing the optimized image with the same record gives the same layers
    again = json.loads(ok(root, "optimize", "demo-opt", "--record", str(rec), "--name", "demo-opt2", "--json"))
    assert [x["chain_id"] for x in again["layer_results"]] == new
    assert "0 problems" in ok(root, "fsck")


def test_optimize_failures_leave_the_store_as_it_was(shared_tmp: Path) -> None:
    tars = layer_tars("-bad")
    buf = io.BytesIO()          # layer 1 with a PAX global header that sets every member's mtime
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"mtime": "1600000000"}) as tf:
        with tarfile.open(fileobj=io.BytesIO(tars[1])) as src:
            for m in src.getmembers():
                tf.addfile(m, src.extractfile(m) if m.isreg() else None)
    tars[1] = buf.getvalue()
    write_layout(shared_tmp / "layout", tars)
    root = shared_tmp / "root"
    ok(root, "pull", f"oci:{shared_tmp / 'layout'}", "--name", "demo")
    chain = layer_chains(root, "demo")
    rec = shared_tmp / "rec.jsonl"
    with LayerStore(root) as st, Recorder(st, chain[-1], rec) as r:
        r.record("bin/busybox")
        r.record("etc/motd")
    state = store_state(root)
    p = fusesnap(root, "optimize", "demo", "--record", str(rec), "--name", "bad")
    assert p.returncode == 1 and p.stderr.decode().count("\n") == 1, p.stderr
    assert "layer 1" in p.stderr.decode() and "PAX global header sets mtime" in p.stderr.decode()
    assert store_state(root) == state              # the rewritten layer 0 is gone again
    assert fusesnap(root, "images", "inspect", "bad").returncode == 1
    for args, words in ((["nope", "--record", str(rec), "--name", "x"], "no such image: nope"),
                        (["demo", "--record", str(shared_tmp / "none.jsonl"), "--name", "x"], "none.jsonl"),
                        (["demo", "--record", str(shared_tmp / "layout" / "index.json"), "--name", "x"], "line 1")):
        p = fusesnap(root, "optimize", *args)
        err = p.stderr.decode()
        assert p.returncode == 1 and err.startswith("fusesnap: error:") and err.count("\n") == 1, err
        assert words in err, err
    assert store_state(root) == state
    assert "0 problems" in ok(root, "fsck")
