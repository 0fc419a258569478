"""entries.json.zst: the compact per-layer member table next to tar-split.json.zst.

One JSON array per tar member, in tar order, 1:1 with the tar-split file entries:
`[path, kind, mode, uid, gid, mtime_ns, size, linkname, devmajor, devminor,
  xattrs, data, sparse, uname, gname, typeflag]`.
Byte strings are stored as str decoded with surrogateescape (lossless for non-UTF-8
names); xattr values are base64. `kind` is null for members the filesystem does not
show (the root entry, GNU volume labels); `data` is the payload's path relative to
fs/ (shadowed payloads of replaced members live under ../shadow/).
It exists so that `entries()` and `export` need not rebuild metadata from raw headers.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard

from ..errors import IntegrityError
from ..layerentry import LayerEntry

P, KIND, MODE, UID, GID, MTIME, SIZE, LINK, DMAJ, DMIN, XATTRS, DATA, SPARSE, UNAME, GNAME, TYPEFLAG = range(16)


def s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def b(x: str) -> bytes:
    return x.encode("utf-8", "surrogateescape")


class EntriesSpool:
    """Records written out as an import produces them (memory stays flat however many
    members a tar has), compressed into entries.json.zst by finish().

    A record whose payload sits at its own path may later be displaced by a member of
    the same name (its payload then moves to shadow/); finish() patches the data paths
    of those records: the i-th record owning path P gets the i-th place P's payloads
    were moved to, the last one keeps P."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "w", encoding="ascii", buffering=1 << 16)
        self.count = 0
        self._owns = bytearray()  # bit per record: its data is at its own path

    def add(self, rec: list[Any], owns_path: bool) -> None:
        i = self.count
        if not i & 7:
            self._owns.append(0)
        if owns_path:
            self._owns[i >> 3] |= 1 << (i & 7)
        self._f.write(json.dumps(rec, separators=(",", ":")))
        self._f.write("\n")
        self.count = i + 1

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def finish(self, dst: Path, displaced: dict[bytes, list[str]]) -> int:
        """Write entries.json.zst; returns the number of records. The spool file is removed."""
        self.close()
        cctx = zstandard.ZstdCompressor(level=1)
        with open(self.path, "rb") as src, open(dst, "wb") as f, cctx.stream_writer(f, closefd=False) as z:
            if not displaced:
                while chunk := src.read(1 << 20):
                    z.write(chunk)
            else:
                seen: dict[bytes, int] = {}
                for i, line in enumerate(src):
                    if self._owns[i >> 3] & (1 << (i & 7)):
                        rec = json.loads(line)
                        p = b(rec[P])
                        moved = displaced.get(p)
                        if moved is not None:
                            k = seen.get(p, 0)
                            seen[p] = k + 1
                            if k < len(moved):
                                rec[DATA] = moved[k]
                                line = (json.dumps(rec, separators=(",", ":")) + "\n").encode("ascii")
                    z.write(line)
        os.unlink(self.path)
        return self.count


def read_records(path: Path) -> Iterator[list[Any]]:
    try:
        with open(path, "rb") as f:
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            for n, line in enumerate(io.TextIOWrapper(reader, encoding="ascii")):
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise IntegrityError(f"{path}: corrupt entries line {n}") from None
                yield rec
    except zstandard.ZstdError as e:
        raise IntegrityError(f"{path}: corrupt entries file: {e}") from None


def to_entry(r: list[Any]) -> LayerEntry:
    x = r[XATTRS]
    return LayerEntry(
        path=b(r[P]), kind=r[KIND], mode=r[MODE], uid=r[UID], gid=r[GID], mtime_ns=r[MTIME],
        size=r[SIZE], linkname=b(r[LINK]), devmajor=r[DMAJ], devminor=r[DMIN],
        xattrs={b(k): base64.b64decode(v) for k, v in x.items()} if x else {},
        data=b(r[DATA]) if r[DATA] is not None else None,
    )
