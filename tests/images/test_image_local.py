"""Pull from and push to OCI layouts, oci-archive and docker-archive files (skopeo writes and
reads them too); image records, rmi and gc; prepare by image name; rootless; progress."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path

import pytest

from helpers import run_as, script, unmount, user_env
from imagebuild import EXPECTED_FILES, layer_tars, sha, write_layout
from registries import skopeo_copy, skopeo_inspect
from storeutil import fusesnap, uncompressed

pytestmark = pytest.mark.usefixtures("skopeo")


def ok(root: Path, *args: str, **kw) -> str:
    p = fusesnap(root, *args, **kw)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout.decode()


def test_pull_every_local_transport(shared_tmp):
    img = write_layout(shared_tmp / "layout", layer_tars("-local"))
    lay = f"oci:{img.layout}:latest"
    skopeo_copy(lay, f"oci-archive:{shared_tmp / 'oci.tar'}:latest")
    skopeo_copy(lay, f"docker-archive:{shared_tmp / 'docker.tar'}:example.com/demo:v1")
    root = shared_tmp / "root"
    results = {}
    for src, name in ((lay, "a"), (f"oci-archive:{shared_tmp / 'oci.tar'}", "b"),
                      (f"docker-archive:{shared_tmp / 'docker.tar'}", "c")):
        results[name] = json.loads(ok(root, "pull", src, "--name", name, "--json"))
    assert results["a"]["manifest_digest"] == img.manifest_digest and results["a"]["transferred"] > 0
    assert results["b"]["manifest_digest"] == img.manifest_digest and results["b"]["present"] == 3
    # a docker-archive has uncompressed layers: the same diffIDs, hence the same chain, nothing imported anew
    assert results["c"]["top_chain"] == results["a"]["top_chain"]
    listed = json.loads(ok(root, "images", "--json"))
    assert [r["name"] for r in listed] == ["a", "b", "c"]
    table = ok(root, "images").splitlines()
    assert table[0].split()[:3] == ["NAME", "MANIFEST", "LAYERS"] and len(table) == 4
    text = ok(root, "images", "inspect", "a")
    assert "entrypoint: /bin/sh" in text and "working_dir: /srv" in text and "env: APP=demo" in text
    assert len(json.loads(ok(root, "layers", "--json"))) == 3
    # gc keeps an image's layers; rmi drops the record, gc the layers
    assert json.loads(ok(root, "gc", "--json"))["removed"] == []
    ok(root, "rmi", "a", "b")
    assert json.loads(ok(root, "gc", "--json"))["removed"] == []      # "c" still needs them
    p = fusesnap(root, "rmi", "a")
    assert p.returncode != 0 and b"no such image: a" in p.stderr
    ok(root, "rmi", "c")
    assert len(json.loads(ok(root, "gc", "--json"))["removed"]) == 3
    assert os.listdir(root / "images" / "blobs" / "sha256") == []
    ok(root, "fsck")


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_pull_zstd_and_plain_layers(shared_tmp, compression):
    tars = layer_tars("-" + compression)
    img = write_layout(shared_tmp / "layout", tars, compression=compression)
    root = shared_tmp / "root"
    out = json.loads(ok(root, "pull", f"oci:{img.layout}", "--json"))
    chain = ok(root, "inspect", out["top_chain"], "--json")
    assert json.loads(chain)["diff_id"] == sha(tars[2])
    # pushed back as it came: the same digests (zstd: the kept blobs; plain: byte-exact export)
    digest = ok(root, "push", f"oci:{img.layout}", f"oci:{shared_tmp / 'out'}:v").strip()
    assert digest == img.manifest_digest


def test_prepare_by_image_name_and_mount(shared_tmp):
    img = write_layout(shared_tmp / "layout", layer_tars("-prep"))
    root = shared_tmp / "root"
    ok(root, "pull", f"oci:{img.layout}", "--name", "demo:1")
    ok(root, "prepare", "work", "demo:1")
    info = json.loads(ok(root, "stat", "work", "--json"))
    top = json.loads(ok(root, "images", "--json"))[0]["top_chain"]
    assert info["parent"] == top
    mp = shared_tmp / "mnt"
    mp.mkdir()
    ok(root, "mount", "work", str(mp))
    try:
        for rel, data in EXPECTED_FILES.items():
            assert (mp / rel).read_bytes() == data
        assert (mp / "bin/busybox").stat().st_mode & 0o111
        assert subprocess.run(["chroot", str(mp), "/bin/sh", "-c", "echo hi"], capture_output=True).stdout == b"hi\n"
    finally:
        unmount(mp)
    # the snapshot keeps the layers after rmi
    ok(root, "rmi", "demo:1")
    assert json.loads(ok(root, "gc", "--json"))["removed"] == []


def test_push_to_local_destinations(shared_tmp):
    tars = layer_tars("-push")
    img = write_layout(shared_tmp / "layout", tars)
    root = shared_tmp / "root"
    ok(root, "pull", f"oci:{img.layout}", "--name", "img")
    # an unchanged image keeps every digest, in a layout and in an oci-archive
    assert ok(root, "push", "img", f"oci:{shared_tmp / 'o1'}:t").strip() == img.manifest_digest
    assert ok(root, "push", "img", f"oci-archive:{shared_tmp / 'o2.tar'}:t").strip() == img.manifest_digest
    assert skopeo_inspect(f"oci-archive:{shared_tmp / 'o2.tar'}:t")["Digest"] == img.manifest_digest
    # docker-archive: uncompressed layers whose digests are the diffIDs; docker's loaders read it
    ok(root, "push", "img", f"docker-archive:{shared_tmp / 'd.tar'}:example.com/img:v1")
    raw = skopeo_inspect(f"docker-archive:{shared_tmp / 'd.tar'}", raw=True)
    assert [x["digest"] for x in raw["layers"]] == img.diff_ids
    skopeo_copy(f"docker-archive:{shared_tmp / 'd.tar'}", f"oci:{shared_tmp / 'back'}:x")
    # --compression zstd: new blobs that decompress to the same diffIDs
    ok(root, "push", "--compression", "zstd", "img", f"oci:{shared_tmp / 'z'}:t")
    m = skopeo_inspect(f"oci:{shared_tmp / 'z'}:t", raw=True)
    assert {x["mediaType"] for x in m["layers"]} == {"application/vnd.oci.image.layer.v1.tar+zstd"}
    for x, t in zip(m["layers"], tars):
        assert uncompressed((shared_tmp / "z/blobs/sha256" / x["digest"][7:]).read_bytes()) == t
    # a layer chain with no image below: a minimal config, gzip layers
    base = ok(root, "import", "-", input=tars[0]).split()[0]
    ok(root, "push", base, f"oci:{shared_tmp / 'plain'}:t")
    cfg = skopeo_inspect(f"oci:{shared_tmp / 'plain'}:t", config=True)
    assert cfg["rootfs"]["diff_ids"] == [sha(tars[0])] and cfg["os"] == "linux"
    p = fusesnap(root, "push", "nothing-here", f"oci:{shared_tmp / 'x'}")
    assert p.returncode != 0 and p.stderr.decode().count("\n") == 1 and b"nothing-here" in p.stderr


def test_pull_rootless(shared_tmp, test_user):
    img = write_layout(shared_tmp / "layout", layer_tars("-user"))
    for p in (shared_tmp / "layout").rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    root = shared_tmp / "userroot"
    env = user_env(test_user)
    p = run_as(test_user, [script("fusesnap"), "--root", str(root), "pull", f"oci:{img.layout}", "--name", "u",
                           "--json"], env=env)
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout)["manifest_digest"] == img.manifest_digest
    assert (root / "images").stat().st_mode & 0o777 == 0o700
    p = run_as(test_user, [script("fusesnap"), "--root", str(root), "push", "u", f"oci:{shared_tmp / 'uout'}"],
               env=env)
    assert p.returncode == 0 and p.stdout.decode().strip() == img.manifest_digest, p.stderr.decode()


def _on_pty(args: list[str]) -> str:
    """Run with stderr on a pseudo-terminal; what the terminal showed."""
    master, slave = pty.openpty()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            b = os.read(master, 65536)
        except OSError:
            break
        if not b:
            break
        chunks.append(b)
    p.wait()
    os.close(master)
    assert p.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_progress_per_layer_on_a_terminal(shared_tmp):
    img = write_layout(shared_tmp / "layout", layer_tars("-tty"))
    root = shared_tmp / "root"
    shown = _on_pty([script("fusesnap"), "--root", str(root), "pull", f"oci:{img.layout}", "--name", "t"])
    for d in img.layer_digests:
        assert d[7:19] in shown
    assert "done" in shown and "pulled t: 3 layers" in shown
    shown = _on_pty([script("fusesnap"), "--root", str(root), "pull", "--quiet", f"oci:{img.layout}", "--name", "q"])
    assert shown == ""
    p = fusesnap(root, "pull", f"oci:{img.layout}", "--name", "r")   # not a terminal: no progress lines
    assert all(d[7:19] not in p.stderr.decode() for d in img.layer_digests)


def test_push_refuses_a_damaged_kept_blob(shared_tmp):
    img = write_layout(shared_tmp / "layout", layer_tars("-damaged"))
    root = shared_tmp / "root"
    ok(root, "pull", f"oci:{img.layout}", "--name", "img")
    kept = root / "images" / "blobs" / "sha256" / img.layer_digests[0][7:]
    data = bytearray(kept.read_bytes())
    data[100] ^= 1
    kept.write_bytes(bytes(data))
    p = fusesnap(root, "push", "img", f"oci:{shared_tmp / 'out'}:t")
    err = p.stderr.decode()
    assert p.returncode != 0 and err.count("\n") == 1 and img.layer_digests[0] in err and "does not match" in err
    assert not (shared_tmp / "out" / "blobs" / "sha256" / img.layer_digests[0][7:]).exists()
