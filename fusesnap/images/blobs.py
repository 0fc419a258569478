"""Blobs by digest: verification while streaming, and the store's own blob directory.

`images/blobs/sha256/<hex>` keeps the compressed layer blobs a pull fetched
(containerd keeps them in its content store for the same reason): gzip output
depends on the compressor, so pushing a pulled image unchanged can only keep
its layer and manifest digests if it sends the original bytes. Uncompressed
layers are not kept; the store exports them byte for byte. These files are a
cache: losing one only means the next push compresses that layer anew.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..digest import hex_of
from ..errors import IntegrityError

CHUNK = 1 << 20


class VerifyingReader:
    """read() that hashes what passes and fails at the end unless digest and size match.

    The failure comes from the read at the end of the stream, so a layer import
    consuming it aborts before it commits anything. A consumer that fails first
    (damaged compression) calls `blame()`: a blob that is not what its digest
    says is the cause to report, whichever byte the consumer tripped over.
    """

    def __init__(self, raw: BinaryIO, digest: str, size: int | None, what: str,
                 tee: BinaryIO | None = None, progress: Callable[[int], None] | None = None) -> None:
        self.raw, self.digest, self.size, self.what = raw, digest, size, what
        self.tee, self.progress = tee, progress
        self.hash = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        b = self.raw.read(n)
        if b:
            self.count += len(b)
            if self.size is not None and self.count > self.size:
                raise IntegrityError(f"{self.what} {self.digest} is longer than the {self.size} bytes its "
                                     "descriptor says")
            self.hash.update(b)
            if self.tee is not None:
                self.tee.write(b)
            if self.progress is not None:
                self.progress(len(b))
        elif n != 0:
            self.check()
        return b

    def blame(self) -> None:
        """Read the rest (no further than the declared size) and raise if the digest does not match."""
        while self.read(CHUNK):
            pass

    def check(self) -> None:
        if self.size is not None and self.count != self.size:
            raise IntegrityError(f"{self.what} {self.digest} is truncated: {self.count} of {self.size} bytes")
        got = "sha256:" + self.hash.hexdigest()
        if got != self.digest:
            raise IntegrityError(f"{self.what} {self.digest} does not match its content (sha256 is {got})")


def digest_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
            size += len(b)
    return "sha256:" + h.hexdigest(), size


def copy_verified(src: Path, dst: Path, digest: str, progress: Callable[[int], None] | None = None) -> None:
    """Copy a blob file, hashing it on the way; `dst` appears (by rename) only if the digest matches."""
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            while b := fi.read(CHUNK):
                h.update(b)
                fo.write(b)
                if progress is not None:
                    progress(len(b))
        got = "sha256:" + h.hexdigest()
        if got != digest:
            raise IntegrityError(f"blob {digest} in {src} does not match its content (sha256 is {got})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def verify_bytes(data: bytes, digest: str, what: str) -> bytes:
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != digest:
        raise IntegrityError(f"{what} {digest} does not match its content (sha256 is {got})")
    return data


class BlobDir:
    """images/blobs/sha256/<hex>: kept compressed layer blobs, written by rename only."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs" / "sha256"
        self.tmp = root / "tmp"
        for d in (self.dir, self.tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.dir / hex_of(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def temp_path(self, stem: str = "") -> Path:
        return self.tmp / f"{stem}{secrets.token_hex(8)}"

    def adopt(self, src: Path, digest: str) -> None:
        """Move a verified file in (a copy when it is on another filesystem)."""
        dst = self.path(digest)
        if dst.exists():
            src.unlink(missing_ok=True)
            return
        try:
            os.rename(src, dst)
        except OSError:
            tmp = self.temp_path()
            shutil.copyfile(src, tmp)
            os.rename(tmp, dst)
            src.unlink(missing_ok=True)

    def remove_unlisted(self, keep: set[str]) -> list[str]:
        """Delete kept blobs no image record lists any more."""
        gone = []
        for p in self.dir.iterdir():
            if "sha256:" + p.name not in keep:
                p.unlink(missing_ok=True)
                gone.append("sha256:" + p.name)
        return gone
