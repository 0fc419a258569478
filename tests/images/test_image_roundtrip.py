"""Pull -> prepare/mount -> change -> commit -> push -> skopeo copy to oci: -> pull into a second
store -> same tree, against a real docker-registry; digests kept; nothing transferred twice."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from registries import skopeo_copy, skopeo_inspect
from helpers import unmount
from imagebuild import EXPECTED_ABSENT, EXPECTED_FILES, config_json, layer_tars, sha, tree_of, write_layout
from storeutil import fusesnap

pytestmark = pytest.mark.usefixtures("skopeo")


def ok(root: Path, *args: str) -> str:
    p = fusesnap(root, *args)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout.decode()


def mounted_tree(root: Path, key: str, mp: Path, change=None) -> dict:
    mp.mkdir(exist_ok=True)
    ok(root, "mount", key, str(mp))
    try:
        if change:
            change(mp)
        return tree_of(mp)
    finally:
        unmount(mp)


def test_registry_round_trip(registry, shared_tmp):
    img = write_layout(shared_tmp / "layout", layer_tars("-rt"))
    skopeo_copy(f"oci:{shared_tmp / 'layout'}:latest", registry.ref("rt/base", "v1"), "--dest-tls-verify=false")
    root = shared_tmp / "root"
    out = ok(root, "pull", "--plain-http", registry.ref("rt/base", "v1")).split()
    name = f"{registry.host}/rt/base:v1"
    rec = json.loads(ok(root, "images", "inspect", name, "--json"))
    assert rec["manifest_digest"] == img.manifest_digest == out[1]
    assert [x["diff_id"] for x in rec["layer_details"]] == img.diff_ids
    assert rec["entrypoint"] == ["/bin/sh"] and rec["working_dir"] == "/srv" and "APP=demo" in rec["env"]

    ok(root, "prepare", "work", name)
    def change(mp: Path) -> None:
        for rel, data in EXPECTED_FILES.items():
            assert (mp / rel).read_bytes() == data
        for rel in EXPECTED_ABSENT:
            assert not (mp / rel).exists()
        assert (mp / "etc/app/config").read_text() == "version=2-rt\n"
        (mp / "srv" / "added").write_text("new file\n")
        (mp / "etc" / "motd").unlink()
    before = mounted_tree(root, "work", shared_tmp / "mnt", change)
    chain = ok(root, "commit", "app-v2", "work").split()[0]

    pushed = ok(root, "push", "--plain-http", "app-v2", registry.ref("rt/app", "v2")).split()[0]
    raw = skopeo_inspect(registry.ref("rt/app", "v2"), "--tls-verify=false", raw=True)
    cfg = skopeo_inspect(registry.ref("rt/app", "v2"), "--tls-verify=false", config=True)
    assert raw["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert len(raw["layers"]) == 4 and raw["layers"][:3] == [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": len(b)}
        for d, b in zip(img.layer_digests, img.layer_blobs)]  # the pulled blobs, sent as they were
    assert cfg["rootfs"]["diff_ids"][:3] == img.diff_ids
    assert cfg["config"]["Entrypoint"] == ["/bin/sh"]          # the base image's config, kept
    assert len(cfg["history"]) == 4 and cfg["history"][3]["created_by"] == "fusesnap commit"
    layers = json.loads(ok(root, "inspect", chain, "--json"))
    assert cfg["rootfs"]["diff_ids"][3] == layers["diff_id"]
    # the base blobs came by cross-repository mount from rt/base, not uploaded again
    assert registry.requests("POST", r"/v2/rt/app/blobs/uploads/\?mount=")
    assert len(registry.requests("PUT", r"/v2/rt/app/blobs/uploads/")) == 2   # new layer + config

    # skopeo copies it back into a layout; a second store pulls that: the same tree
    skopeo_copy(registry.ref("rt/app", "v2"), f"oci:{shared_tmp / 'copy'}:v2", "--src-tls-verify=false")
    root2 = shared_tmp / "root2"
    out2 = ok(root2, "pull", f"oci:{shared_tmp / 'copy'}:v2", "--name", "again").split()
    assert out2[0] == chain and out2[1] == pushed
    ok(root2, "view", "look", "again")
    after = mounted_tree(root2, "look", shared_tmp / "mnt2")
    assert after == before
    assert "srv/added" in after and "etc/motd" not in after
    for r in (root, root2):
        ok(r, "fsck")


def test_repull_and_repush_transfer_nothing(registry, shared_tmp):
    write_layout(shared_tmp / "layout", layer_tars("-again"))
    skopeo_copy(f"oci:{shared_tmp / 'layout'}:latest", registry.ref("again/img"), "--dest-tls-verify=false")
    root = shared_tmp / "root"
    first = json.loads(ok(root, "pull", "--plain-http", registry.ref("again/img"), "--json"))
    assert first["present"] == 0 and first["transferred"] > 0
    blob_gets = len(registry.requests("GET", r"/v2/again/img/blobs/"))
    second = json.loads(ok(root, "pull", "--plain-http", registry.ref("again/img"), "--name", "copy", "--json"))
    assert second["present"] == 3 and second["transferred"] == 0
    # only the config was fetched again, no layer
    assert len(registry.requests("GET", r"/v2/again/img/blobs/")) == blob_gets + 1
    puts = len(registry.requests("PUT", r"/v2/again/img/blobs/uploads/"))
    res = json.loads(ok(root, "push", "--plain-http", "copy", registry.ref("again/img", "copy"), "--json"))
    assert res["uploaded"] == 0 and res["skipped"] == 4
    assert res["manifest_digest"] == first["manifest_digest"]     # the same image, byte for byte
    assert len(registry.requests("PUT", r"/v2/again/img/blobs/uploads/")) == puts


def test_multi_platform_index(registry, shared_tmp):
    """An index with amd64 and arm64 images: this machine's by default, --platform picks another."""
    lay = shared_tmp / "multi"
    amd = write_layout(lay, layer_tars("-amd"), tag="amd")
    arm_tars = layer_tars("-arm")
    arm = write_layout(lay, arm_tars, tag="arm",
                       config=config_json([sha(t) for t in arm_tars], arch="arm64"))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d.manifest_digest,
         "size": (lay / "blobs/sha256" / d.manifest_digest[7:]).stat().st_size,
         "platform": {"os": "linux", "architecture": a}} for d, a in ((amd, "amd64"), (arm, "arm64"))]}
    data = json.dumps(index).encode()
    (lay / "blobs/sha256" / sha(data)[7:]).write_bytes(data)
    (lay / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": index["mediaType"], "digest": sha(data), "size": len(data),
         "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))
    skopeo_copy(f"oci:{lay}:multi", registry.ref("multi/img"), "--all", "--dest-tls-verify=false")
    root = shared_tmp / "root"
    host = subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip()
    default = json.loads(ok(root, "pull", "--plain-http", registry.ref("multi/img"), "--json"))
    want = amd if host == "x86_64" else arm
    assert default["manifest_digest"] == want.manifest_digest
    other = json.loads(ok(root, "pull", "--plain-http", "--platform", "linux/arm64", registry.ref("multi/img"),
                          "--name", "arm", "--json"))
    assert other["manifest_digest"] == arm.manifest_digest and other["platform"] == "linux/arm64"
    # the same as a Docker manifest list of schema 2 manifests
    skopeo_copy(f"oci:{lay}:multi", registry.ref("multi/v2s2"), "--all", "--format", "v2s2",
                "--dest-tls-verify=false")
    raw = skopeo_inspect(registry.ref("multi/v2s2"), "--tls-verify=false", raw=True)
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.list.v2+json"
    docker = json.loads(ok(root, "pull", "--plain-http", "--platform", "linux/arm64", registry.ref("multi/v2s2"),
                           "--name", "arm-v2s2", "--json"))
    assert docker["platform"] == "linux/arm64" and docker["top_chain"] == other["top_chain"]
    p = fusesnap(root, "pull", "--plain-http", "--platform", "linux/s390x", registry.ref("multi/img"))
    err = p.stderr.decode()
    assert p.returncode != 0 and err.count("\n") == 1 and "linux/amd64" in err and "linux/arm64" in err


def test_docker_schema2_image(registry, shared_tmp):
    """A Docker v2 schema 2 manifest (skopeo --format v2s2): pulled, and pushed back unchanged
    it is the same manifest; into an OCI layout it becomes an OCI manifest over the same blobs."""
    img = write_layout(shared_tmp / "layout", layer_tars("-v2s2"))
    skopeo_copy(f"oci:{img.layout}:latest", registry.ref("v2s2/img"), "--format", "v2s2", "--dest-tls-verify=false")
    raw = skopeo_inspect(registry.ref("v2s2/img"), "--tls-verify=false", raw=True)
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    root = shared_tmp / "root"
    res = json.loads(ok(root, "pull", "--plain-http", registry.ref("v2s2/img"), "--name", "d", "--json"))
    assert json.loads(ok(root, "images", "inspect", "d", "--json"))["media_type"] == raw["mediaType"]
    back = ok(root, "push", "--plain-http", "d", registry.ref("v2s2/img", "again")).strip()
    assert back == res["manifest_digest"]
    ok(root, "push", "d", f"oci:{shared_tmp / 'out'}:x")
    out = skopeo_inspect(f"oci:{shared_tmp / 'out'}:x", raw=True)
    assert out["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert [x["digest"] for x in out["layers"]] == [x["digest"] for x in raw["layers"]]
    assert out["config"]["digest"] == raw["config"]["digest"]


def test_pull_by_digest_and_retag(registry, shared_tmp):
    """docker://HOST/REPO@DIGEST is verified against that digest; pulling another image under the
    same name replaces the record, and the old image's own layers become garbage."""
    lay = shared_tmp / "layout"
    old = write_layout(lay, layer_tars("-v1"))
    skopeo_copy(f"oci:{lay}:latest", registry.ref("retag/img"), "--dest-tls-verify=false")
    root = shared_tmp / "root"
    by_digest = f"docker://{registry.host}/retag/img@{old.manifest_digest}"
    res = json.loads(ok(root, "pull", "--plain-http", by_digest, "--json"))
    assert res["name"] == f"{registry.host}/retag/img@{old.manifest_digest}"
    ok(root, "pull", "--plain-http", registry.ref("retag/img"), "--name", "app")
    new = write_layout(lay, layer_tars("-v2"))
    skopeo_copy(f"oci:{lay}:latest", registry.ref("retag/img"), "--dest-tls-verify=false")
    res = json.loads(ok(root, "pull", "--plain-http", registry.ref("retag/img"), "--name", "app", "--json"))
    assert res["manifest_digest"] == new.manifest_digest
    assert sorted(r["name"] for r in json.loads(ok(root, "images", "--json"))) == sorted([
        "app", f"{registry.host}/retag/img@{old.manifest_digest}"])
    assert json.loads(ok(root, "gc", "--json"))["removed"] == []      # the digest record keeps the old one
    ok(root, "rmi", f"{registry.host}/retag/img@{old.manifest_digest}")
    gone = json.loads(ok(root, "gc", "--json"))["removed"]
    assert len(gone) == 3 and res["top_chain"] not in gone            # old chain only (no layer shared)
    p = fusesnap(root, "pull", "--plain-http", f"docker://{registry.host}/retag/img@sha256:{'0' * 64}")
    assert p.returncode != 0 and b"not found" in p.stderr
