"""One interface per direction over every transport: where a pull reads, where a push writes.

Sources give the top manifest (or index), child manifests and small blobs by
digest; local ones open layer blobs in place, the registry downloads them.
Destinations say which blobs they have, take blobs and a manifest, and make
the result visible at commit() (archives are packed then, by rename).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from . import manifest as mf
from .dockerarchive import DockerArchiveSource, DockerArchiveWriter
from .ocilayout import LayoutArchiveWriter, LayoutSource, LayoutWriter
from .reference import ImageRef
from .registry import RegistryClient, RemoteOptions

Progress = Callable[[int], None]


class ImageSource(Protocol):
    where: str
    remote: bool

    def top_manifest(self) -> tuple[bytes, str | None, str | None]:
        """(bytes, media type if the transport says, expected digest if known)."""
    def child_manifest(self, desc: mf.Descriptor) -> bytes: ...
    def blob_bytes(self, desc: mf.Descriptor) -> bytes: ...
    def open_blob(self, desc: mf.Descriptor) -> BinaryIO: ...
    def close(self) -> None: ...


class ImageDestination(Protocol):
    def has_blob(self, desc: mf.Descriptor) -> bool: ...
    def put_blob(self, desc: mf.Descriptor, src: Path | bytes, progress: Progress | None = None) -> None: ...
    def put_manifest(self, m: mf.Manifest, config: bytes) -> str: ...
    def commit(self) -> None: ...
    def close(self) -> None: ...


class RegistrySource:
    remote = True

    def __init__(self, ref: ImageRef, opts: RemoteOptions) -> None:
        self.ref = ref
        self.client = RegistryClient(ref, opts)
        self.where = f"{ref.registry}/{ref.repository}"

    def top_manifest(self) -> tuple[bytes, str | None, str | None]:
        data, ctype = self.client.get_manifest(self.ref.reference)
        return data, ctype, self.ref.digest

    def child_manifest(self, desc: mf.Descriptor) -> bytes:
        return self.client.get_manifest(desc.digest)[0]

    def blob_bytes(self, desc: mf.Descriptor) -> bytes:
        return self.client.blob_bytes(desc, "config" if "config" in desc.media_type else "blob")

    def open_blob(self, desc: mf.Descriptor) -> BinaryIO:
        raise NotImplementedError("registry blobs are downloaded, not opened")

    def download(self, desc: mf.Descriptor, path: Path, progress: Progress) -> None:
        self.client.download(desc, path, progress)

    def close(self) -> None:
        self.client.close()


class RegistryDestination:
    def __init__(self, ref: ImageRef, opts: RemoteOptions) -> None:
        self.ref = ref
        self.client = RegistryClient(ref, opts, push=True)

    def has_blob(self, desc: mf.Descriptor) -> bool:
        return self.client.has_blob(desc)

    def mount_from(self, desc: mf.Descriptor, repository: str) -> bool:
        return self.client.mount_blob(desc, repository)

    def put_blob(self, desc: mf.Descriptor, src: Path | bytes, progress: Progress | None = None) -> None:
        self.client.upload(desc, src, progress or (lambda n: None))

    def put_manifest(self, m: mf.Manifest, config: bytes) -> str:
        self.client.put_manifest(self.ref.reference, m.raw, m.media_type)
        return "sha256:" + hashlib.sha256(m.raw).hexdigest()

    def commit(self) -> None:
        pass

    def close(self) -> None:
        self.client.close()


def open_source(ref: ImageRef, opts: RemoteOptions) -> ImageSource:
    if ref.transport == "oci":
        return LayoutSource.open_dir(ref.path, ref.tag)
    if ref.transport == "oci-archive":
        return LayoutSource.open_archive(ref.path, ref.tag)
    if ref.transport == "docker-archive":
        return DockerArchiveSource(ref.path, ref.tag)
    return RegistrySource(ref, opts)


def open_destination(ref: ImageRef, opts: RemoteOptions) -> ImageDestination:
    if ref.transport == "oci":
        return LayoutWriter(Path(ref.path), ref.tag)
    if ref.transport == "oci-archive":
        return LayoutArchiveWriter(Path(ref.path), ref.tag)
    if ref.transport == "docker-archive":
        return DockerArchiveWriter(Path(ref.path), ref.tag)
    return RegistryDestination(ref, opts)
