"""Image references, platforms, manifests and auth-file lookup: parsing rules, no I/O beyond tmp files."""

from __future__ import annotations

import base64
import gzip
import io
import json
import tarfile

import pytest

from fusesnap.errors import InvalidInput
from fusesnap.images import manifest as mf
from fusesnap.images.auth import find_credentials, parse_challenge
from fusesnap.images.detect import image_archive_kind
from fusesnap.images.reference import parse_ref


@pytest.mark.parametrize("text,want", [
    ("docker://localhost:5000/a/b:v1", ("localhost:5000", "a/b", "v1", None)),
    ("docker://127.0.0.1:5000/app", ("127.0.0.1:5000", "app", "latest", None)),
    ("docker://busybox", ("docker.io", "library/busybox", "latest", None)),
    ("docker://quay.io/org/x@sha256:" + "a" * 64, ("quay.io", "org/x", None, "sha256:" + "a" * 64)),
    ("docker://user/app:1.2", ("docker.io", "user/app", "1.2", None)),
])
def test_docker_references(text, want):
    r = parse_ref(text)
    assert (r.registry, r.repository, r.tag, r.digest) == want
    assert str(parse_ref(str(r))) == str(r)


def test_local_references():
    r = parse_ref("oci:/tmp/lay:v2")
    assert (r.transport, r.path, r.tag) == ("oci", "/tmp/lay", "v2")
    assert parse_ref("oci-archive:x.tar").tag is None
    r = parse_ref("docker-archive:/x/s.tar:example.com/a:b")
    assert (r.path, r.tag) == ("/x/s.tar", "example.com/a:b")
    assert r.name() == "docker-archive:/x/s.tar:example.com/a:b"
    assert parse_ref("docker://h:1/r:t").name() == "h:1/r:t"


@pytest.mark.parametrize("text", ["oci", "docker:/x", "docker://Host/UPPER", "docker://h/r@sha256:12",
                                  "s3:bucket", "oci::tag", "docker://h/r:bad tag", "oci:/d:bad/tag"])
def test_bad_references(text):
    with pytest.raises(InvalidInput):
        parse_ref(text)


def test_platforms():
    assert str(mf.Platform.parse("linux/arm64/v8")) == "linux/arm64/v8"
    with pytest.raises(InvalidInput):
        mf.Platform.parse("linux")
    p = mf.Platform("linux", "arm64", "v8")
    assert p.matches({"os": "linux", "architecture": "arm64"})
    assert not p.matches({"os": "linux", "architecture": "amd64"})
    assert not mf.Platform("linux", "arm", "v7").matches({"os": "linux", "architecture": "arm", "variant": "v6"})


def test_manifest_validation():
    good = {"schemaVersion": 2, "mediaType": mf.OCI_MANIFEST,
            "config": {"mediaType": mf.OCI_CONFIG, "digest": "sha256:" + "1" * 64, "size": 2},
            "layers": [{"mediaType": mf.OCI_LAYER_GZIP, "digest": "sha256:" + "2" * 64, "size": 3}]}
    m = mf.parse(json.dumps(good).encode())
    assert isinstance(m, mf.Manifest) and m.compression(0) == "gzip"
    for broken, word in (({**good, "layers": [{"digest": "md5:x", "size": 1}]}, "digest"),
                         ({**good, "layers": [{"digest": "sha256:" + "2" * 64, "size": -1}]}, "size"),
                         ({"schemaVersion": 1, "fsLayers": []}, "schema 1"),
                         ({**good, "mediaType": "application/x-other"}, "unsupported")):
        with pytest.raises(InvalidInput, match=word):
            mf.parse(json.dumps(broken).encode())
    with pytest.raises(InvalidInput, match="JSON"):
        mf.parse(b"{nope")
    odd = mf.parse(json.dumps({**good, "layers": [{"mediaType": "x/y", "digest": "sha256:" + "2" * 64, "size": 3}]})
                   .encode())
    with pytest.raises(InvalidInput, match="media type"):
        odd.compression(0)


def test_auth_files(tmp_path, monkeypatch):
    for k in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DOCKER_CONFIG"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert find_credentials("r.example:5000", "a/b") is None
    enc = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text(json.dumps({"auths": {
        "https://r.example:5000": {"auth": enc("u1:p1")},
        "r.example:5000/a": {"auth": enc("u2:p:2")},
        "https://index.docker.io/v1/": {"auth": enc("hub:pw")}}}))
    assert find_credentials("r.example:5000", "x/y").username == "u1"
    c = find_credentials("r.example:5000", "a/b")
    assert (c.username, c.password) == ("u2", "p:2")            # the longer (repository) key wins
    assert find_credentials("docker.io", "library/busybox").username == "hub"
    run = tmp_path / "run"
    (run / "containers").mkdir(parents=True)
    (run / "containers" / "auth.json").write_text(json.dumps({"auths": {"r.example:5000": {"auth": enc("pod:1")}}}))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    assert find_credentials("r.example:5000", "x/y").username == "pod"   # containers' file first
    assert find_credentials("r.example:5000", "x/y", creds="cli:pw").username == "cli"
    with pytest.raises(InvalidInput, match="--creds"):
        find_credentials("r", "x", creds="nocolon")
    (run / "containers" / "auth.json").write_text("{broken")
    with pytest.raises(InvalidInput, match="auth file"):
        find_credentials("r.example:5000", "x/y")


def test_challenges():
    assert parse_challenge('Bearer realm="https://a/token",service="reg",scope="repository:x:pull"') == (
        "bearer", {"realm": "https://a/token", "service": "reg", "scope": "repository:x:pull"})
    assert parse_challenge('Basic realm="r"')[0] == "basic"


def test_archive_detection():
    def tar(*names: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for n in names:
                t.addfile(tarfile.TarInfo(n), io.BytesIO(b""))
        return buf.getvalue()

    assert image_archive_kind(tar("a" * 64 + ".tar", "manifest.json")) == "docker-archive"
    assert image_archive_kind(tar("blobs/sha256/" + "b" * 64, "oci-layout")) == "oci-archive"
    assert image_archive_kind(tar("etc/manifest.json", "usr/bin/x")) is None
    assert image_archive_kind(gzip.compress(tar("manifest.json"))) == "docker-archive"
