"""Helpers for the store tests: run the CLI, read tars back, snapshot a store's state."""

from __future__ import annotations

import gzip
import io
import os
import sqlite3
import subprocess
import tarfile
from pathlib import Path

import zstandard

from helpers import script


def fusesnap(root: Path, *args: str, input: bytes | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([script("fusesnap"), "--root", str(root), *args], input=input,
                          capture_output=True, **kw)


def tar_of(files: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A layer tar of regular files, in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def uncompressed(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    return data


def store_state(root: Path) -> tuple:
    """Everything that must not change when an import fails: DB rows and directory listings."""
    rows: list = []
    db = root / "metadata.db"
    if db.exists():
        c = sqlite3.connect(db)
        for t in ("layers", "compressed_digests", "layer_refs", "layer_labels"):
            rows.append(sorted(c.execute(f"SELECT * FROM {t}").fetchall()))
        c.close()
    dirs = []
    for d in ("layers", "staging", "trash"):
        p = root / d
        dirs.append(sorted(os.listdir(p)) if p.exists() else [])
    return tuple(map(tuple, rows)), tuple(map(tuple, dirs))
