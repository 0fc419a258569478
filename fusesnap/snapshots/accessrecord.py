"""Access records on disk: which files a workload needed, in first-access order, and from which layer.

A record is JSON lines {"path", "layer_index", "chain_id", "size"}, written by a
recorded mount (`-o record=FILE`, fs/core/recording.py) or by the Recorder
API. layer_index counts from the bottom layer (0); the upper of a mount is one
more than its top layer and has no chainID. Paths are relative to the root of
the merged tree; names that are not UTF-8 travel as their raw bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..digest import is_digest
from ..errors import InvalidInput
from ..fs.core.recording import record_line

# A record longer than this is not a workload's start-up: refuse it rather than fill memory.
MAX_LINES = 10_000_000


@dataclass(frozen=True)
class RecordEntry:
    path: str           # relative to the merged root, os.fsdecode'd
    layer_index: int
    chain_id: str | None
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "layer_index": self.layer_index, "chain_id": self.chain_id, "size": self.size}


def _entry(doc: Any, where: str) -> RecordEntry:
    if not isinstance(doc, dict):
        raise InvalidInput(f"{where}: not a JSON object")
    path, idx, chain, size = doc.get("path"), doc.get("layer_index"), doc.get("chain_id"), doc.get("size")
    if not isinstance(path, str) or not path.strip("/") or "\0" in path:
        raise InvalidInput(f"{where}: \"path\" must be a non-empty file name")
    if not isinstance(idx, int) or isinstance(idx, bool) or idx < -1:
        raise InvalidInput(f"{where}: \"layer_index\" must be a whole number")
    if chain is not None and (not isinstance(chain, str) or not is_digest(chain)):
        raise InvalidInput(f"{where}: \"chain_id\" must be a sha256 digest or null")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"{where}: \"size\" must be a byte count")
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise InvalidInput(f"{where}: \"path\" must not contain '..'")
    return RecordEntry("/".join(parts), idx, chain, size)


def load(path: str | os.PathLike) -> list[RecordEntry]:
    """The entries of a record file, in its order; InvalidInput names the first bad line."""
    out: list[RecordEntry] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n > MAX_LINES:
                raise InvalidInput(f"{os.fsdecode(path)}: more than {MAX_LINES:,} lines")
            if not raw.strip():
                continue
            where = f"{os.fsdecode(path)} line {n}"
            try:
                doc = json.loads(raw.decode("utf-8", "surrogateescape"))
            except ValueError as e:
                raise InvalidInput(f"{where}: not JSON ({e})") from None
            out.append(_entry(doc, where))
    return out


def dump(path: str | os.PathLike, entries: Iterable[RecordEntry]) -> None:
    """Write a record file (mode 0600) by rename, so a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            for e in entries:
                f.write(record_line(e.path, e.layer_index, e.chain_id, e.size))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def first_accesses(entries: Iterable[RecordEntry]) -> list[RecordEntry]:
    """Each path once, where it was first recorded (two records of one workload may be joined)."""
    seen: set[str] = set()
    out = []
    for e in entries:
        if e.path not in seen:
            seen.add(e.path)
            out.append(e)
    return out


def summarize(entries: Sequence[RecordEntry]) -> dict[str, Any]:
    """Files and bytes in total and per layer, bottom layer first."""
    layers: dict[tuple[int, str | None], dict[str, Any]] = {}
    for e in entries:
        row = layers.setdefault((e.layer_index, e.chain_id), {
            "layer_index": e.layer_index, "chain_id": e.chain_id, "files": 0, "bytes": 0})
        row["files"] += 1
        row["bytes"] += e.size
    rows = sorted(layers.values(), key=lambda r: (r["layer_index"], r["chain_id"] or ""))
    return {"files": len(entries), "bytes": sum(e.size for e in entries), "layers": rows}


def layer_order(entries: Sequence[RecordEntry], chain: Sequence[str]) -> list[int]:
    """Positions in `chain` (bottom-to-top chainIDs) of the layers a record reads from, in the
    order the workload first read from them.

    An entry is matched by its chainID, else (a record of another build of the image) by its
    layer_index. Entries without a chainID are a store mount's upper where other entries
    have one (files the workload made: no layer holds them), else a record of plain
    directories, matched by layer_index."""
    pos = {c: i for i, c in enumerate(chain)}
    store_record = any(e.chain_id for e in entries)
    out: list[int] = []
    for e in entries:
        if e.chain_id in pos:
            i = pos[e.chain_id]
        elif e.chain_id is None and store_record:
            continue
        else:
            i = e.layer_index
        if 0 <= i < len(chain) and i not in out:
            out.append(i)
    return out
