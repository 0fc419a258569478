"""OCI image layouts (index.json, oci-layout, blobs/sha256/...): read from a directory or an
archive of one, written into a directory (`oci:`) or packed into an archive (`oci-archive:`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ..digest import hex_of
from ..errors import InvalidInput, NotFound
from . import manifest as mf
from .blobs import copy_verified
from .localfiles import DirFiles, Files, TarFiles, read_small
from .packing import ArchiveStaging, write_atomic

LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'


def blob_name(digest: str) -> str:
    return f"blobs/sha256/{hex_of(digest)}"


class LayoutSource:
    """`oci:DIR[:TAG]` or `oci-archive:FILE[:TAG]` as an image source."""

    remote = False

    def __init__(self, files: Files, tag: str | None) -> None:
        self.files, self.tag = files, tag
        self.where = files.where
        if not files.exists(LAYOUT_FILE):
            files.close()
            raise InvalidInput(f"{files.where} is not an OCI image layout (no oci-layout file)")
        try:
            version = json.loads(read_small(files, LAYOUT_FILE)).get("imageLayoutVersion")
        except (ValueError, AttributeError):
            version = None
        if version != "1.0.0":
            files.close()
            raise InvalidInput(f"{files.where}: unsupported oci-layout version {version!r}")

    @classmethod
    def open_dir(cls, path: str, tag: str | None) -> "LayoutSource":
        return cls(DirFiles(Path(path)), tag)

    @classmethod
    def open_archive(cls, path: str, tag: str | None) -> "LayoutSource":
        files = TarFiles(Path(path))
        if not files.exists(LAYOUT_FILE) and files.exists("manifest.json"):
            files.close()
            raise InvalidInput(f"{path} is a docker-archive, not an oci-archive (use docker-archive:{path})")
        return cls(files, tag)

    def top_manifest(self) -> tuple[bytes, str | None, str | None]:
        index = mf.parse(read_small(self.files, "index.json"), mf.OCI_INDEX)
        if not isinstance(index, mf.Index):
            raise InvalidInput(f"{self.where}: index.json is not an image index")
        if self.tag:
            hits = [d for d in index.manifests if d.annotations.get(mf.REF_NAME) == self.tag]
            if not hits:
                raise NotFound(f"{self.where} has no image tagged {self.tag!r} (tags: {self._tags(index)})")
            d = hits[-1]
        elif len(index.manifests) == 1:
            d = index.manifests[0]
        else:
            raise InvalidInput(f"{self.where} holds {len(index.manifests)} images: name one with :TAG "
                               f"(tags: {self._tags(index)})")
        return self.blob_bytes(d), d.media_type, d.digest

    @staticmethod
    def _tags(index: mf.Index) -> str:
        return ", ".join(d.annotations.get(mf.REF_NAME, "-") for d in index.manifests) or "none"

    def child_manifest(self, desc: mf.Descriptor) -> bytes:
        return self.blob_bytes(desc)

    def blob_bytes(self, desc: mf.Descriptor) -> bytes:
        return read_small(self.files, blob_name(desc.digest))

    def open_blob(self, desc: mf.Descriptor) -> BinaryIO:
        return self.files.open(blob_name(desc.digest))

    def close(self) -> None:
        self.files.close()


class LayoutWriter:
    """Adds blobs and a tagged manifest to a layout directory; every file lands by rename."""

    def __init__(self, root: Path, tag: str | None) -> None:
        self.root, self.tag = root, tag
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        if not (root / LAYOUT_FILE).exists():
            write_atomic(root / LAYOUT_FILE, LAYOUT_VERSION)

    def has_blob(self, desc: mf.Descriptor) -> bool:
        p = self.root / blob_name(desc.digest)
        return p.is_file() and p.stat().st_size == desc.size

    def put_blob(self, desc: mf.Descriptor, src: Path | bytes,
                 progress: Callable[[int], None] | None = None) -> None:
        dst = self.root / blob_name(desc.digest)
        if isinstance(src, bytes):
            write_atomic(dst, src)
            return
        copy_verified(src, dst, desc.digest, progress)

    def put_manifest(self, m: mf.Manifest, config: bytes) -> str:
        """Write the manifest blob and point index.json's entry for our tag at it."""
        digest = "sha256:" + hashlib.sha256(m.raw).hexdigest()
        desc = mf.Descriptor(m.media_type, digest, len(m.raw))
        self.put_blob(desc, m.raw)
        index_path = self.root / "index.json"
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": []}
        if index_path.exists():
            try:
                doc = json.loads(index_path.read_bytes())
            except ValueError as e:
                raise InvalidInput(f"{index_path} is not valid JSON: {e}") from None
        entries = [e for e in doc.get("manifests", [])
                   if not self.tag or (e.get("annotations") or {}).get(mf.REF_NAME) != self.tag]
        entry = desc.to_json()
        if self.tag:
            entry["annotations"] = {mf.REF_NAME: self.tag}
        entries.append(entry)
        doc["manifests"] = entries
        write_atomic(index_path, mf.dumps(doc))
        return digest

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass


class LayoutArchiveWriter(LayoutWriter):
    """`oci-archive:FILE[:TAG]`: a layout staged beside FILE, packed into FILE at commit."""

    def __init__(self, path: Path, tag: str | None) -> None:
        self.staging = ArchiveStaging(path)
        super().__init__(self.staging.dir, tag)

    def commit(self) -> None:
        self.staging.pack()

    def close(self) -> None:
        self.staging.close()
