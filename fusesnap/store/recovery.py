"""Finishing what a crash interrupted, and rebuilding what a damaged database lost.

- Intents (db.py): a directory given up in a transaction (a removed layer, a
  committed snapshot's upper) or claimed before it was put in place (a commit's
  new layer) is deleted unless a row owns it: a layers/<hex> directory is owned
  by its layer row. Recovery of a layer's intent takes that layer's lock, so an
  operation still in progress is never undone.
- Leftovers: staging directories whose import died (their lock is free), stale
  staging locks, trash.
- Layer directories without a row and without an intent are complete layers
  whose database row was lost (an import killed between rename and commit, a
  truncated database): their row is rebuilt from layer.json (or, for layers
  written before it existed, from the index itself), after export verified
  every byte against the diffID. A complete, verifiable layer is never deleted.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path

from ..digest import chain_id as compute_chain_id
from ..errors import FusesnapError, IntegrityError
from ..tarsplit.index import FILE_TYPE, read_index
from .db import StoreDB
from .exporter import export_layer
from .layerrecord import LayerRecord
from .layout import ENTRIES, TAR_SPLIT, StoreLayout, rmtree
from .locks import is_locked

log = logging.getLogger("fusesnap.store")


@dataclass
class FsckReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def merge(self, other: "FsckReport") -> None:
        self.checked += other.checked
        self.problems += other.problems
        self.repaired += other.repaired

    def to_json(self) -> dict:
        return {"checked": self.checked, "problems": self.problems, "repaired": self.repaired, "ok": self.ok}


class _Counter:
    """A sink that counts what export writes."""

    def __init__(self) -> None:
        self.n = 0

    def write(self, b: bytes) -> int:
        self.n += len(b)
        return len(b)


def replay_intents(layout: StoreLayout, db: StoreDB, rep: FsckReport, repair: bool) -> None:
    """Delete the directories pending intents give up (when nothing owns them any more)."""
    for iid, path, reason in db.intents():
        p = layout.root / path
        if path.startswith("layers/"):
            chain = "sha256:" + p.name
            try:
                lock = layout.chain_lock(chain, blocking=False)
            except BlockingIOError:
                continue  # the operation that wrote it is still running
            with lock:
                owned = db.has_layer(chain)
                if not repair:
                    if not owned and p.exists():
                        rep.problems.append(f"layer directory {path} was left by an interrupted {reason}")
                    continue
                if not owned and p.exists():
                    layout.trash(p)
                    rep.repaired.append(f"removed {path} (left by an interrupted {reason})")
                with db.tx() as t:
                    db.drop_intent(t, iid)
            continue
        if not repair:
            if p.exists():
                rep.problems.append(f"directory {path} was left by an interrupted {reason}")
            continue
        if p.exists():
            layout.trash(p)
            rep.repaired.append(f"removed {path} (left by an interrupted {reason})")
        with db.tx() as t:
            db.drop_intent(t, iid)


def check_leftovers(layout: StoreLayout, rep: FsckReport, repair: bool) -> None:
    """Staging directories of dead imports, stale staging locks, trash."""
    for p in sorted(layout.staging_dir.iterdir()):
        if p.name.endswith(".lock"):
            if not (layout.staging_dir / p.name[:-5]).exists() and not is_locked(p):
                if repair:
                    p.unlink(missing_ok=True)
                    rep.repaired.append(f"removed stale staging lock staging/{p.name}")
                else:
                    rep.problems.append(f"stale staging lock staging/{p.name}")
            continue
        lock = layout.staging_dir / f"{p.name}.lock"
        if is_locked(lock):
            continue  # a live import
        if repair:
            layout.trash(p)
            lock.unlink(missing_ok=True)
            rep.repaired.append(f"removed staging leftover staging/{p.name}")
        else:
            rep.problems.append(f"staging leftover staging/{p.name}")
    for p in sorted(layout.trash_dir.iterdir()):
        if repair:
            rmtree(p)
            rep.repaired.append(f"removed trash leftover trash/{p.name}")
        else:
            rep.problems.append(f"trash leftover trash/{p.name}")


def is_complete(d: Path) -> bool:
    return (d / "fs").is_dir() and (d / TAR_SPLIT).is_file() and (d / ENTRIES).is_file()


def rowless_layers(layout: StoreLayout, db: StoreDB) -> list[Path]:
    """Layer directories that have no database row and no pending intent."""
    claimed = db.intent_paths()
    out = []
    for p in sorted(layout.layers_dir.iterdir()):
        if len(p.name) != 64 or f"layers/{p.name}" in claimed:
            continue
        if not db.has_layer("sha256:" + p.name):
            out.append(p)
    return out


def _diff_size(d: Path) -> int:
    return sum(e.size for e in read_index(d / TAR_SPLIT) if e.type == FILE_TYPE)


def _record_of(d: Path, known: set[str]) -> LayerRecord:
    """The layer's record, checked against its data (export verifies every CRC and the digest)."""
    chain = "sha256:" + d.name
    rec = LayerRecord.read(d)
    counter = _Counter()
    digest = export_layer(d, rec.diff_id if rec else None, counter, chain)  # type: ignore[arg-type]
    if rec is None:  # written before layers carried their record: derive it from the index
        parent = None
        if chain != digest:
            parent = next((p for p in sorted(known) if compute_chain_id(p, digest) == chain), None)
            if parent is None:
                raise IntegrityError(f"layer {chain}: no known parent gives this chainID")
        created = _mtime_rfc3339(d)
        rec = LayerRecord(chain, digest, parent, _diff_size(d), counter.n, created)
    if compute_chain_id(rec.parent, rec.diff_id) != chain or rec.chain_id != chain:
        raise IntegrityError(f"layer {chain}: its layer.json does not match its directory")
    if rec.tar_size != counter.n:
        raise IntegrityError(f"layer {chain}: layer.json records {rec.tar_size} tar bytes, the index gives"
                             f" {counter.n}")
    return rec


def _mtime_rfc3339(d: Path) -> str:
    return datetime.fromtimestamp(os.stat(d).st_mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def insert_record(db: StoreDB, rec: LayerRecord) -> list[str]:
    """Insert a layer's row from its record; returns the names it could not get back (taken)."""
    lost = []
    with db.tx() as t:
        db.insert_layer(t, rec.chain_id, rec.diff_id, rec.parent, rec.diff_size, rec.tar_size, rec.created)
        for k, v in rec.labels.items():
            db.set_label(t, rec.chain_id, k, v)
        for digest, size in rec.compressed:
            db.add_compressed(t, digest, rec.diff_id, size)
    for name in rec.names:
        try:
            with db.tx() as t:
                db.add_name(t, rec.chain_id, name)
        except FusesnapError:
            lost.append(name)
    return lost


def check_rowless(layout: StoreLayout, db: StoreDB, rep: FsckReport, repair: bool) -> None:
    """Layer directories without a row: rebuild complete ones (parents first), remove half-made ones."""
    pending = rowless_layers(layout, db)
    if not repair:
        for p in pending:
            what = "has no database row (fsck --repair rebuilds it from its record)" if is_complete(p) \
                else "is half-made (no index): fsck --repair removes it"
            rep.problems.append(f"layer directory layers/{p.name} {what}")
        return
    incomplete = [p for p in pending if not is_complete(p)]
    for p in incomplete:
        chain = "sha256:" + p.name
        try:
            lock = layout.chain_lock(chain, blocking=False)
        except BlockingIOError:
            continue
        with lock:
            if not db.has_layer(chain):
                layout.trash(p)
                rep.repaired.append(f"removed half-made layer directory layers/{p.name}")
    todo = [p for p in pending if is_complete(p)]
    known = {r[0] for r in db.layers()} | {"sha256:" + p.name for p in todo}
    failed: dict[Path, str] = {}
    while todo:
        progress = False
        for p in list(todo):
            chain = "sha256:" + p.name
            try:
                rec = _record_of(p, known)
            except (FusesnapError, OSError) as e:
                failed[p] = str(e)
                todo.remove(p)
                continue
            if rec.parent and not db.has_layer(rec.parent):
                continue  # its parent first
            try:
                lock = layout.chain_lock(chain, blocking=False)
            except BlockingIOError:
                todo.remove(p)
                continue
            with lock:
                if not db.has_layer(chain):
                    lost = insert_record(db, rec)
                    msg = f"rebuilt the database row of {chain} from its layer record"
                    if lost:
                        msg += f" (names now used by other layers: {', '.join(lost)})"
                    rep.repaired.append(msg)
            todo.remove(p)
            progress = True
        if not progress:
            for p in todo:
                failed[p] = f"layer sha256:{p.name}: its parent has no database row"
            break
    for p, why in failed.items():
        rep.problems.append(f"layer directory layers/{p.name} has no database row and cannot get one back: {why}")


def recover(layout: StoreLayout, db: StoreDB) -> FsckReport:
    """What gc and cleanup run first: pending intents and leftovers (never a complete layer)."""
    rep = FsckReport()
    replay_intents(layout, db, rep, True)
    check_leftovers(layout, rep, True)
    for r in rep.repaired:
        log.info("recovered: %s", r)
    return rep
