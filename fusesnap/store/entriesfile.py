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


def write_entries(path: Path, records: list[list[Any]]) -> None:
    cctx = zstandard.ZstdCompressor(level=1)
    with open(path, "wb") as f, cctx.stream_writer(f, closefd=False) as z:
        buf = []
        for r in records:
            buf.append(json.dumps(r, separators=(",", ":")))
            if len(buf) >= 1024:
                z.write(("\n".join(buf) + "\n").encode("ascii"))
                buf.clear()
        if buf:
            z.write(("\n".join(buf) + "\n").encode("ascii"))


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
