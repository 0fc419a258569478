"""Container images built offline: layer tars from a list of entries (busybox-static
and a few files make a rootfs that runs anywhere), and an OCI image layout archive
(`podman load -i`) from layer tars. Stdlib only."""

from __future__ import annotations

import hashlib
import io
import json
import platform
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BUSYBOX = "/bin/busybox"  # Debian busybox-static: no shared libraries to bring along
MTIME = 1_700_000_000
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


@dataclass
class Entry:
    """One member of a layer tar: kind "dir", "file", "symlink", "hardlink" or "chr"."""

    path: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    target: str = ""  # symlink target, or the hard link's earlier member
    xattrs: dict[str, bytes] = field(default_factory=dict)
    rdev: tuple[int, int] = (0, 0)

    def tarinfo(self) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(self.path)
        ti.mode, ti.uid, ti.gid, ti.mtime = self.mode, self.uid, self.gid, MTIME
        ti.type = {"dir": tarfile.DIRTYPE, "file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE,
                   "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE}[self.kind]
        ti.linkname = self.target
        ti.devmajor, ti.devminor = self.rdev
        # PAX records are strings; tarfile writes them as UTF-8 with surrogateescape
        ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in self.xattrs.items()}
        ti.size = len(self.data) if self.kind == "file" else 0
        return ti


def busybox_entries(bindir: str, applets: list[str]) -> list[Entry]:
    """bindir/busybox (the host's busybox-static) and applet symlinks to it."""
    data = Path(BUSYBOX).read_bytes()
    out = [Entry(bindir, "dir", mode=0o755), Entry(f"{bindir}/busybox", data=data, mode=0o755)]
    out += [Entry(f"{bindir}/{a}", "symlink", target="busybox", mode=0o777) for a in applets]
    return out


def layer_tar(entries: list[Entry]) -> bytes:
    """An uncompressed layer tar of the entries, in order (PAX format)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            t.addfile(e.tarinfo(), io.BytesIO(e.data) if e.kind == "file" else None)
    return buf.getvalue()


def _sha256_of(layer: bytes | Path) -> tuple[str, int]:
    if isinstance(layer, bytes):
        return hashlib.sha256(layer).hexdigest(), len(layer)
    h = hashlib.sha256()
    with open(layer, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest(), layer.stat().st_size


def write_oci_archive(dst: Path, layers: list[bytes | Path], ref: str, config: dict | None = None) -> str:
    """An OCI image layout as one tar (podman's "oci-archive"): the layers (uncompressed
    tars, bottom first, given as bytes or files), an image config and a manifest named
    ref. Returns the manifest digest."""

    def add(t: tarfile.TarFile, name: str, data: bytes | Path) -> None:
        ti = tarfile.TarInfo(name)
        ti.mode, ti.mtime = 0o644, MTIME
        if isinstance(data, bytes):
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
        else:
            ti.size = data.stat().st_size
            with open(data, "rb") as f:
                t.addfile(ti, f)

    with tarfile.open(dst, "w") as t:
        descs = []
        for layer in layers:
            hexd, size = _sha256_of(layer)
            add(t, f"blobs/sha256/{hexd}", layer)
            descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{hexd}",
                          "size": size})
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(MTIME))
        cfg = {"architecture": GOARCH.get(platform.machine(), platform.machine()), "os": "linux", "config": config or {},
               "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]},
               # one entry per layer: builds on this image check that they agree
               "history": [{"created": created, "created_by": f"layer {i} (written offline)"}
                           for i in range(len(descs))]}

        def blob(obj: dict, media: str) -> dict:
            data = json.dumps(obj, sort_keys=True).encode()
            hexd = hashlib.sha256(data).hexdigest()
            add(t, f"blobs/sha256/{hexd}", data)
            return {"mediaType": media, "digest": f"sha256:{hexd}", "size": len(data)}

        config_desc = blob(cfg, "application/vnd.oci.image.config.v1+json")
        manifest = blob({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                         "config": config_desc, "layers": descs}, "application/vnd.oci.image.manifest.v1+json")
        manifest["annotations"] = {"org.opencontainers.image.ref.name": ref}
        add(t, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add(t, "index.json", json.dumps({"schemaVersion": 2, "manifests": [manifest]}).encode())
    return manifest["digest"]
