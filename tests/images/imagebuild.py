"""Small test images built offline, without fusesnap: a busybox-static tree in three layers
(whiteouts, an opaque directory, a hard link, a symlink), written as an OCI layout by hand."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import zstandard

from tarbuild import TarBuilder

BUSYBOX = Path("/bin/busybox")
MTIME = 1_700_000_000


def _tar(members: list[tuple]) -> bytes:
    """members: (name, kind, payload_or_target, mode); kinds: dir, file, symlink, hardlink."""
    tb = TarBuilder()
    for name, kind, data, mode in members:
        if kind == "dir":
            tb.add(name, mode=mode, mtime=MTIME)
        elif kind == "file":
            tb.add(name, data, mode=mode, mtime=MTIME)
        else:
            tb.add(name, mode=mode, kind=tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE, link=data,
                   mtime=MTIME)
    return tb.data()


def layer_tars(salt: str = "") -> list[bytes]:
    """Three layers; `salt` makes a distinct image with the same shape."""
    busybox = BUSYBOX.read_bytes()
    base = [
        ("bin", "dir", None, 0o755), ("bin/busybox", "file", busybox, 0o755),
        ("bin/sh", "symlink", "busybox", 0o777), ("bin/ls", "symlink", "busybox", 0o777),
        ("etc", "dir", None, 0o755), ("etc/hostname", "file", b"base\n", 0o644),
        ("etc/app", "dir", None, 0o755), ("etc/app/config", "file", f"version=1{salt}\n".encode(), 0o644),
        ("opt", "dir", None, 0o755), ("opt/data", "dir", None, 0o755),
        ("opt/data/a", "file", b"a" * 5000, 0o644), ("opt/data/b", "file", b"b\n", 0o600),
        ("usr", "dir", None, 0o755), ("usr/share", "dir", None, 0o755), ("usr/share/doc", "dir", None, 0o755),
        ("usr/share/doc/README", "file", b"docs\n", 0o644),
        ("tmp", "dir", None, 0o1777),
    ]
    middle = [
        ("etc", "dir", None, 0o755), ("etc/.wh.hostname", "file", b"", 0o644),
        ("etc/motd", "file", b"welcome\n", 0o644), ("etc/motd.link", "hardlink", "etc/motd", 0o644),
        ("opt", "dir", None, 0o755), ("opt/data", "dir", None, 0o755),
        ("opt/data/.wh..wh..opq", "file", b"", 0o644), ("opt/data/fresh", "file", b"fresh\n", 0o644),
    ]
    top = [
        ("etc", "dir", None, 0o755), ("etc/app", "dir", None, 0o755),
        ("etc/app/config", "file", f"version=2{salt}\n".encode(), 0o640),
        ("usr", "dir", None, 0o755), ("usr/share", "dir", None, 0o755), ("usr/share/.wh.doc", "file", b"", 0o644),
        ("srv", "dir", None, 0o755), ("srv/big", "file", os.urandom(300_000), 0o644),
    ]
    return [_tar(base), _tar(middle), _tar(top)]


# What the image's rootfs holds after applying the layers (paths relative to the root).
EXPECTED_FILES = {
    "etc/motd": b"welcome\n",
    "etc/motd.link": b"welcome\n",
    "opt/data/fresh": b"fresh\n",
}
EXPECTED_ABSENT = ["etc/hostname", "opt/data/a", "opt/data/b", "usr/share/doc"]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def compress(data: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(data, 6, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


LAYER_TYPES = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
               "none": "application/vnd.oci.image.layer.v1.tar"}


@dataclass
class BuiltImage:
    layout: Path
    manifest_digest: str
    config_digest: str
    diff_ids: list[str]
    layer_digests: list[str]
    layer_blobs: list[bytes]


def config_json(diff_ids: list[str], arch: str = "amd64", **runtime) -> bytes:
    cfg = {"architecture": arch, "os": "linux", "created": "2026-01-01T00:00:00Z",
           "config": {"Entrypoint": ["/bin/sh"], "Cmd": ["-c", "echo hi"], "Env": ["PATH=/bin", "APP=demo"],
                      "WorkingDir": "/srv", **runtime},
           "rootfs": {"type": "layers", "diff_ids": diff_ids},
           "history": [{"created_by": f"layer {i}"} for i in range(len(diff_ids))]}
    return json.dumps(cfg, indent=1).encode()


def write_layout(layout: Path, tars: list[bytes], compression: str = "gzip", tag: str = "latest",
                 config: bytes | None = None, blobs_override: dict[int, bytes] | None = None) -> BuiltImage:
    """Write an OCI layout holding one image (added to an existing index.json)."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')

    def put(data: bytes) -> str:
        d = sha(data)
        (layout / "blobs" / "sha256" / d[7:]).write_bytes(data)
        return d

    diff_ids = [sha(t) for t in tars]
    blobs = [compress(t, compression) for t in tars]
    for i, b in (blobs_override or {}).items():
        blobs[i] = b
    digests = [put(b) for b in blobs]
    cfg = config if config is not None else config_json(diff_ids)
    cdig = put(cfg)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdig, "size": len(cfg)},
        "layers": [{"mediaType": LAYER_TYPES[compression], "digest": d, "size": len(b)}
                   for d, b in zip(digests, blobs)],
    }).encode()
    mdig = put(manifest)
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdig,
                               "size": len(manifest),
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    index_path.write_text(json.dumps(index))
    return BuiltImage(layout, mdig, cdig, diff_ids, digests, blobs)


def tree_of(root: Path) -> dict[str, tuple]:
    """A comparable picture of a rootfs: type, mode bits, content digest or link target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d", st.st_mode & 0o7777)
            else:
                out[rel] = ("f", st.st_mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest())
    return out
