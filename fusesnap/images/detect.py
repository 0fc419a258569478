"""Is this layer tar really an image archive? (`fusesnap import` refuses those unless --raw.)

Looks at the member names in the first bytes of the (decompressed) stream:
every producer of image archives puts a telling name early — `manifest.json`,
`oci-layout`, `blobs/sha256/<hex>`, `<hex>.tar`, `<hex>/layer.tar` at the top
— and a seekable plain tar is scanned header by header to its end.
"""

from __future__ import annotations

import io
import re
import tarfile
import zlib
from typing import BinaryIO

import zstandard

PEEK = 256 << 10
_HEX = r"[0-9a-f]{64}"
_DOCKER = re.compile(rf"^(?:manifest\.json|{_HEX}\.tar|{_HEX}/layer\.tar)$")
_OCI = re.compile(rf"^(?:oci-layout|blobs/sha256/{_HEX})$")


def kind_of_name(name: str) -> str | None:
    n = name.lstrip("./").lstrip("/")
    if _OCI.match(n):
        return "oci-archive"
    if _DOCKER.match(n):
        return "docker-archive"
    return None


def _decompressed(prefix: bytes) -> bytes:
    """As much of the uncompressed stream as `prefix` yields (a cut-off stream is fine)."""
    try:
        if prefix.startswith(b"\x1f\x8b"):
            return zlib.decompressobj(31).decompress(prefix, 4 * PEEK)
        if prefix.startswith(b"\x28\xb5\x2f\xfd"):  # bounded: a few KB of zstd can hold gigabytes
            return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(prefix)).read(4 * PEEK)
    except (zlib.error, zstandard.ZstdError):
        return b""
    return prefix


def _names_in(block: bytes) -> list[str]:
    """Member names of the complete ustar/GNU headers in a tar prefix."""
    names = []
    off = 0
    while off + 512 <= len(block):
        h = block[off:off + 512]
        if not h.strip(b"\0"):
            break
        try:
            size = int(h[124:136].strip(b"\0 ").decode() or "0", 8)
        except ValueError:
            break
        name = h[0:100].split(b"\0")[0]
        if h[257:262] == b"ustar" and h[345:500].strip(b"\0"):
            name = h[345:500].split(b"\0")[0] + b"/" + name
        if h[156:157] not in (b"x", b"g", b"L", b"K"):
            names.append(name.decode("utf-8", "replace"))
        off += 512 + (size + 511) // 512 * 512
    return names


def image_archive_kind(prefix: bytes) -> str | None:
    """'docker-archive' / 'oci-archive' if the stream starting with `prefix` looks like one."""
    for name in _names_in(_decompressed(prefix)):
        k = kind_of_name(name)
        if k:
            return k
    return None


def scan_plain_tar(f: BinaryIO) -> str | None:
    """Every member name of a seekable plain tar (headers only; payloads are skipped by seeking)."""
    pos = f.tell()
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            while (m := tar.next()) is not None:
                tar.members.clear()  # TarFile keeps every member it read: memory would grow with the tar
                k = kind_of_name(m.name)
                if k:
                    return k
    except Exception:  # noqa: BLE001 - tarfile fails in many ways on hostile headers; import judges those
        return None
    finally:
        f.seek(pos)
    return None


class _Replay:
    """A read() source that returns the peeked prefix first, then the rest of the stream."""

    def __init__(self, prefix: bytes, raw: BinaryIO) -> None:
        self.prefix, self.raw = prefix, raw

    def read(self, n: int = -1) -> bytes:
        if not self.prefix:
            return self.raw.read(n)
        if n < 0:
            b, self.prefix = self.prefix, b""
            return b + self.raw.read()
        b, self.prefix = self.prefix[:n], self.prefix[n:]
        return b


def peek_archive(f: BinaryIO) -> tuple[BinaryIO, str | None]:
    """(a stream to import that starts where f did, the image-archive kind f looks like or None)."""
    try:
        seekable = f.seekable()
    except (AttributeError, ValueError):
        seekable = False
    prefix = b""
    while len(prefix) < PEEK:
        b = f.read(PEEK - len(prefix))
        if not b:
            break
        prefix += b
    kind = image_archive_kind(prefix)
    if seekable:
        f.seek(-len(prefix), 1)
        if kind is None and not prefix.startswith((b"\x1f\x8b", b"\x28\xb5\x2f\xfd")):
            kind = scan_plain_tar(f)
        return f, kind
    return _Replay(prefix, f), kind  # type: ignore[return-value]
