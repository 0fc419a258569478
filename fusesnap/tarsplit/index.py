"""The tar-split index: JSON lines in vbatts/tar-split's `tar/storage` schema, zstd-compressed.

One object per line, keys in the order Go's encoding/json writes them:
- segment: `{"type":2,"payload":"<base64 raw bytes>","position":N}`
- file:    `{"type":1,"name":"<path>","size":S,"payload":"<base64 crc64>","position":N}`
  (`name_raw` = base64 of the name bytes instead of `name` when it is not UTF-8;
  `size` is omitted when 0 and `payload` is null then, as tar-split does).
`position` counts entries from 0. Segments hold header blocks and padding verbatim;
file entries stand for the payload, found on disk and checked with CRC-64/ISO.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from ..errors import IntegrityError
from .crc64 import crc_b64, crc_from_b64

FILE_TYPE = 1
SEGMENT_TYPE = 2
SEGMENT_CHUNK = 1 << 20  # trailing junk is split like tar-split does, never one huge line
FLUSH_CHARS = 1 << 20  # lines buffered before compression: memory stays flat for junk segments
# names that need no JSON escaping: printable ASCII without '"' and backslash
_PLAIN_NAME = re.compile(rb"[\x20-\x21\x23-\x5b\x5d-\x7e]*")


@dataclass(slots=True)
class IndexEntry:
    type: int
    position: int
    payload: bytes = b""  # segment bytes
    name: bytes = b""
    size: int = 0
    crc: int | None = None


class IndexWriter:
    """Streams entries into a zstd-compressed JSON-lines file."""

    def __init__(self, f: BinaryIO, level: int = 1) -> None:
        self._f = f
        self._z = zstandard.ZstdCompressor(level=level).stream_writer(f, closefd=False)
        self._buf: list[str] = []
        self._chars = 0
        self._pos = 0

    def segment(self, raw: bytes | bytearray) -> None:
        for i in range(0, len(raw), SEGMENT_CHUNK) if raw else ():
            self._emit('{"type":2,"payload":"%s","position":%d}\n'
                       % (base64.b64encode(raw[i : i + SEGMENT_CHUNK]).decode("ascii"), self._pos))

    def file(self, name: bytes, size: int, crc: int | None) -> None:
        if _PLAIN_NAME.fullmatch(name):
            nm = '"name":"%s"' % name.decode("ascii")
        else:
            try:
                nm = '"name":' + json.dumps(name.decode("utf-8"))
            except UnicodeDecodeError:
                nm = '"name_raw":"%s"' % base64.b64encode(name).decode("ascii")
        sz = ',"size":%d' % size if size else ""
        pl = '"%s"' % crc_b64(crc) if crc is not None else "null"
        self._emit('{"type":1,%s%s,"payload":%s,"position":%d}\n' % (nm, sz, pl, self._pos))

    def _emit(self, line: str) -> None:
        self._buf.append(line)
        self._chars += len(line)
        self._pos += 1
        if len(self._buf) >= 512 or self._chars >= FLUSH_CHARS:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._z.write("".join(self._buf).encode("utf-8"))
            self._buf.clear()
            self._chars = 0

    def close(self) -> None:
        self.flush()
        self._z.close()


def read_index(path: Path) -> Iterator[IndexEntry]:
    """Entries of a tar-split.json.zst, checking that positions are consecutive."""
    with open(path, "rb") as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        text = io.TextIOWrapper(reader, encoding="utf-8")
        expect = 0
        for line in text:
            try:
                obj = json.loads(line)
                t = obj["type"]
                pos = obj["position"]
            except (ValueError, KeyError, TypeError):
                raise IntegrityError(f"{path}: corrupt tar-split line {expect}") from None
            if pos != expect:
                raise IntegrityError(f"{path}: tar-split position {pos}, expected {expect}")
            expect += 1
            payload = obj.get("payload")
            if t == SEGMENT_TYPE:
                yield IndexEntry(SEGMENT_TYPE, pos, payload=base64.b64decode(payload or ""))
            elif t == FILE_TYPE:
                if "name_raw" in obj:
                    name = base64.b64decode(obj["name_raw"])
                else:
                    name = obj.get("name", "").encode("utf-8")
                yield IndexEntry(FILE_TYPE, pos, name=name, size=obj.get("size", 0),
                                 crc=crc_from_b64(payload) if payload else None)
            else:
                raise IntegrityError(f"{path}: unknown tar-split entry type {t}")
