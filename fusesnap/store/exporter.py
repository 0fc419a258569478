"""Reassembling a layer's original tar from tar-split.json.zst, entries.json.zst and fs/.

Segments are replayed verbatim; each file entry's payload is read back from disk
(following the sparse map for sparse members), its CRC-64 compared with the index,
and the sha256 of everything written compared with the diffID at the end.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from ..errors import IntegrityError
from ..tarsplit.crc64 import crc64_update
from ..tarsplit.index import SEGMENT_TYPE, read_index
from . import entriesfile
from .decompress import ThreadedSha256

FLUSH = 1 << 20
CHUNK = 1 << 20
DIRECT = 64 << 10


def export_layer(layer_dir: Path, diff_id: str | None, dst: BinaryIO, label: str) -> str:
    """Write the layer's tar to dst; returns its digest, which must equal diff_id when one is given."""
    h = ThreadedSha256()  # hashing overlaps with reading files and writing dst
    out = bytearray()
    try:
        fs_fd = os.open(layer_dir / "fs", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        raise IntegrityError(f"layer {label}: fs/ directory is missing ({err.strerror})") from None

    def flush() -> None:
        if out:
            b = bytes(out)  # the hash thread needs an immutable copy
            dst.write(b)
            h.update(b)
            out.clear()

    try:
        recs = entriesfile.read_records(layer_dir / "entries.json.zst")
        for e in read_index(layer_dir / "tar-split.json.zst"):
            if e.type == SEGMENT_TYPE:
                out += e.payload
            else:
                rec = next(recs, None)
                if rec is None:
                    raise IntegrityError(f"layer {label}: entries index ends before the tar-split index")
                if e.size:
                    name = e.name.decode("utf-8", "backslashreplace")
                    if len(name) > 120:
                        name = name[:100] + "..." + name[-17:]
                    if rec[entriesfile.DATA] is None:
                        raise IntegrityError(f"layer {label}: no stored data for file {name}")
                    path = entriesfile.b(rec[entriesfile.DATA])  # relative to fs/ ("../shadow/N" for replaced payloads)
                    extents = rec[entriesfile.SPARSE] if rec[entriesfile.SPARSE] is not None else [[0, e.size]]
                    crc = 0
                    try:
                        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fs_fd)
                    except OSError as err:
                        raise IntegrityError(f"layer {label}: file {name} is missing ({err.strerror})") from None
                    try:
                        for off, n in extents:
                            while n:
                                b = os.pread(fd, min(n, CHUNK), off)
                                if not b:
                                    raise IntegrityError(f"layer {label}: file {name} is shorter than recorded")
                                crc = crc64_update(b, crc)
                                if len(b) >= DIRECT:
                                    flush()
                                    dst.write(b)
                                    h.update(b)
                                else:
                                    out += b
                                off += len(b)
                                n -= len(b)
                    finally:
                        os.close(fd)
                    if crc != e.crc:
                        raise IntegrityError(f"layer {label}: file {name} does not match its recorded CRC-64")
            if len(out) >= FLUSH:
                flush()
        if next(recs, None) is not None:
            raise IntegrityError(f"layer {label}: entries index has more members than the tar-split index")
        flush()
    except FileNotFoundError as err:
        raise IntegrityError(f"layer {label}: {err.filename} is missing") from None
    finally:
        os.close(fs_fd)
        h.close()
    got = "sha256:" + h.hexdigest()
    if diff_id is not None and got != diff_id:
        raise IntegrityError(f"layer {label}: exported tar has digest {got}, expected diffID {diff_id}")
    return got
