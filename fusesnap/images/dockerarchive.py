"""`docker-archive:` files, what `docker save` and `podman save` write: manifest.json naming a
config file and layer tars (uncompressed by convention) inside one tar.

There is no registry manifest in such an archive: the source describes the image
by an OCI manifest it builds from the files' digests (the manifest digest of an
image pulled from an archive is that of this description).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ..digest import hex_of
from ..errors import InvalidInput
from . import manifest as mf
from .blobs import copy_verified
from .localfiles import TarFiles, read_small
from .packing import ArchiveStaging, write_atomic
from .reference import parse_docker

MAGIC_TYPES = ((b"\x1f\x8b", mf.OCI_LAYER_GZIP), (b"\x28\xb5\x2f\xfd", mf.OCI_LAYER_ZSTD))


def _entry(doc: Any, tag: str | None, where: str) -> dict[str, Any]:
    if not isinstance(doc, list) or not doc or not all(isinstance(e, dict) for e in doc):
        raise InvalidInput(f"{where}: manifest.json is not a list of images")
    if tag is None:
        if len(doc) > 1:
            tags = ", ".join(t for e in doc for t in e.get("RepoTags") or []) or "none"
            raise InvalidInput(f"{where} holds {len(doc)} images: name one as docker-archive:FILE:NAME:TAG "
                               f"(tags: {tags})")
        return doc[0]
    want = parse_docker(tag)
    for e in doc:
        for t in e.get("RepoTags") or []:
            try:
                if parse_docker(t) == want:
                    return e
            except InvalidInput:
                continue
    raise InvalidInput(f"{where} has no image tagged {tag!r}")


class DockerArchiveSource:
    remote = False

    def __init__(self, path: str, tag: str | None) -> None:
        self.where = path
        self.files = TarFiles(Path(path))
        try:
            if not self.files.exists("manifest.json"):
                hint = f" (an OCI archive: use oci-archive:{path})" if self.files.exists("oci-layout") else ""
                raise InvalidInput(f"{path} is not a docker-archive: no manifest.json{hint}")
            try:
                doc = json.loads(read_small(self.files, "manifest.json"))
            except (ValueError, UnicodeDecodeError) as e:
                raise InvalidInput(f"{path}: manifest.json is not valid JSON: {e}") from None
            entry = _entry(doc, tag, path)
            self.config_name = entry.get("Config")
            layers = entry.get("Layers")
            if not isinstance(self.config_name, str) or not isinstance(layers, list) \
                    or not all(isinstance(x, str) for x in layers):
                raise InvalidInput(f"{path}: manifest.json entry lacks Config or Layers")
            self.names: dict[str, str] = {}
            config = read_small(self.files, self.config_name)
            cdesc = mf.Descriptor(mf.OCI_CONFIG, "sha256:" + hashlib.sha256(config).hexdigest(), len(config))
            self.names[cdesc.digest] = self.config_name
            self.layers = [self._describe(name) for name in layers]
            self.manifest = mf.oci_manifest(cdesc, self.layers)
        except BaseException:
            self.files.close()
            raise

    def _describe(self, name: str) -> mf.Descriptor:
        """A layer's descriptor: digest of the member's bytes, media type by its magic."""
        h = hashlib.sha256()
        size = 0
        head = b""
        with self.files.open(name) as f:
            while b := f.read(1 << 20):
                if not head:
                    head = b[:4]
                h.update(b)
                size += len(b)
        mt = next((t for magic, t in MAGIC_TYPES if head.startswith(magic)), mf.OCI_LAYER)
        d = mf.Descriptor(mt, "sha256:" + h.hexdigest(), size)
        self.names[d.digest] = name
        return d

    def top_manifest(self) -> tuple[bytes, str | None, str | None]:
        return self.manifest, mf.OCI_MANIFEST, None

    def child_manifest(self, desc: mf.Descriptor) -> bytes:
        raise InvalidInput(f"{self.where}: a docker-archive has no manifest {desc.digest}")

    def _name(self, desc: mf.Descriptor) -> str:
        try:
            return self.names[desc.digest]
        except KeyError:
            raise InvalidInput(f"{self.where} has no blob {desc.digest}") from None

    def blob_bytes(self, desc: mf.Descriptor) -> bytes:
        return read_small(self.files, self._name(desc))

    def open_blob(self, desc: mf.Descriptor) -> BinaryIO:
        return self.files.open(self._name(desc))

    def close(self) -> None:
        self.files.close()


class DockerArchiveWriter:
    """Writes `<hex>.tar` layers, `<hex>.json` config and manifest.json, then packs the archive."""

    def __init__(self, path: Path, tag: str | None) -> None:
        self.tag = tag
        self.staging = ArchiveStaging(path)

    @staticmethod
    def _file(desc: mf.Descriptor) -> str:
        return hex_of(desc.digest) + (".json" if "config" in desc.media_type else ".tar")

    def has_blob(self, desc: mf.Descriptor) -> bool:
        return False

    def put_blob(self, desc: mf.Descriptor, src: Path | bytes,
                 progress: Callable[[int], None] | None = None) -> None:
        dst = self.staging.dir / self._file(desc)
        if isinstance(src, bytes):
            write_atomic(dst, src)
        else:
            copy_verified(src, dst, desc.digest, progress)

    def put_manifest(self, m: mf.Manifest, config: bytes) -> str:
        entry = {"Config": self._file(m.config), "RepoTags": [self.tag] if self.tag else [],
                 "Layers": [self._file(d) for d in m.layers]}
        write_atomic(self.staging.dir / "manifest.json", json.dumps([entry]).encode())
        return "sha256:" + hashlib.sha256(m.raw).hexdigest()

    def commit(self) -> None:
        self.staging.pack()

    def close(self) -> None:
        self.staging.close()
