"""LayerStore: content-addressed layers keyed by chainID (see docs/ARCHITECTURE.md "Store API").

Layout: see layout.py. SQL: see db.py (one database shared with the snapshotter).

Import is two steps, usable apart: `stage_tar` builds the layer in staging/ in
one streaming pass; `publish` writes its layer.json, makes it durable (one
syncfs, or per-file fsync for small layers), renames it to layers/<hex> under
the chainID lock and inserts its row in a transaction the caller may extend
(a commit adds the snapshot rows to the same transaction). A crash leaves at
worst a dead staging dir or a complete layer dir without a row, which `fsck
--repair` rebuilds from its layer.json; a publish with `claim=True` (commit)
records an intent first, so a crash before its transaction deletes the layer
dir instead (its files may be links to a live upper).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from ..crashpoints import crash_point
from ..digest import chain_id as compute_chain_id, is_digest
from ..errors import DamagedStore, InUse, IntegrityError, InvalidInput, NotFound
from ..layerentry import LayerEntry
from ..tarsplit.index import IndexWriter
from ..tarsplit.parser import TarParser
from ..tarsplit.stream import ByteStream
from . import entriesfile
from .db import GC_ROOT_LABEL, NAME_LABEL, StoreDB, Tx
from .decompress import LayerStream
from .exporter import export_layer
from .extract import Extractor, feed_member
from .fsck import fsck, missing_database
from .layerrecord import LayerRecord
from .layout import ENTRIES, TAR_SPLIT, StoreLayout, fsync_dir, rmtree, sync_tree
from .locks import FileLock
from .pipeline import ExtractPipeline
from .recovery import FsckReport, check_leftovers, recover, replay_intents

log = logging.getLogger("fusesnap.store")

__all__ = ["GC_ROOT_LABEL", "NAME_LABEL", "ENTRIES", "TAR_SPLIT", "FsckReport", "LayerInfo", "LayerStore",
           "StagedLayer", "StoreTransaction", "rmtree"]


@dataclass
class LayerInfo:
    chain_id: str
    diff_id: str
    parent: str | None
    size: int
    diff_size: int
    created: str
    compressed_digests: list[str] = field(default_factory=list)
    refcount: int = 0
    labels: dict[str, str] = field(default_factory=dict)  # fusesnap.io/name: the first of `names`
    tar_size: int = 0  # bytes of the uncompressed tar (what export writes)
    names: list[str] = field(default_factory=list)  # every name that resolves to this layer

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StagedLayer:
    """A layer built in staging/, not yet visible; close() discards what publish did not take."""

    path: Path
    lock: FileLock
    chain_id: str
    diff_id: str
    parent: str | None
    diff_size: int
    tar_size: int
    members: int
    compressed_digest: str | None
    compressed_size: int

    def close(self) -> None:
        if self.path.exists():
            rmtree(self.path)
        self.lock.path.unlink(missing_ok=True)
        self.lock.close()

    def __enter__(self) -> "StagedLayer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StoreTransaction:
    """What LayerStore.transaction() hands out: SQL on the caller's own tables (errors come
    out as one line), and reference changes on layers that commit or roll back with it."""

    def __init__(self, db: StoreDB, t: Tx) -> None:
        self._db = db
        self._t = t

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self._t.execute(sql, params)

    def add_ref(self, chain_id: str, holder: str) -> None:
        if not self._db.has_layer(chain_id):
            raise NotFound(f"no such layer: {chain_id}")
        self._db.add_ref(self._t, chain_id, holder, "ref")

    def drop_ref(self, chain_id: str, holder: str) -> None:
        self._db.drop_ref(self._t, chain_id, holder, "ref")

    def release_all(self, holder: str) -> None:
        """Drop every retain `holder` has (e.g. all layers of a pull once its record exists)."""
        self._db.drop_retains(self._t, holder)

    def retain_holders(self, prefix: str) -> list[str]:
        """Holders of retains whose name starts with `prefix` (to find those of dead processes)."""
        return self._db.retain_holders(self._t, prefix)


def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LayerStore:
    def __init__(self, root: Path | str, *, check: bool = True, finish: bool = True) -> None:
        """Open (or create) the store at root. A missing or empty database beside existing layers
        is damage (DamagedStore), not an empty store; fsck opens with check=False to rebuild it.
        `finish` carries out the intents of crashed operations (e.g. deletes the upper a killed
        commit left beside its new layer); fsck without repair opens with finish=False."""
        self.root = Path(root)
        self.layout = StoreLayout(self.root)
        self.layout.create()
        self.layers_dir = self.layout.layers_dir
        self.staging_dir = self.layout.staging_dir
        self.trash_dir = self.layout.trash_dir
        self.locks_dir = self.layout.locks_dir
        if check:
            why = missing_database(self.layout)
            if why is not None:
                raise DamagedStore(why)
        self.db = StoreDB(self.layout.db_path)
        if finish:
            self.finish_intents()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "LayerStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths --------------------------------------------------------------------------------
    def layer_dir(self, chain_id: str) -> Path:
        return self.layout.layer_dir(chain_id)

    def fs_dir(self, chain_id: str) -> Path:
        return self.layer_dir(self.get(chain_id).chain_id) / "fs"

    # -- queries ------------------------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """chainID for a chainID, a name, or a unique hex prefix (>= 12 digits, with or without sha256:)."""
        db = self.db
        if is_digest(ref) and db.has_layer(ref):
            return ref
        named = db.chains_named(ref)
        if named:
            return named[0]
        hx = ref[7:] if ref.startswith("sha256:") else ref
        if 12 <= len(hx) <= 64 and all(ch in "0123456789abcdef" for ch in hx):
            rows = db.chains_with_prefix(hx)
            if len(rows) == 1:
                return rows[0]
            if len(rows) > 1:
                raise InvalidInput(f"layer reference {ref!r} is ambiguous")
        raise NotFound(f"no such layer: {ref}")

    _resolve = resolve

    def _info(self, row: tuple[Any, ...]) -> LayerInfo:
        chain, diff, parent, diff_size, size, tar_size, created = row
        refcount, labels, names, comp = self.db.details(chain, diff)
        if names:
            labels[NAME_LABEL] = names[0]
        return LayerInfo(chain, diff, parent, size, diff_size, created, comp, refcount, labels, tar_size, names)

    def get(self, ref: str) -> LayerInfo:
        row = self.db.layer(self.resolve(ref))
        if not row:
            raise NotFound(f"no such layer: {ref}")
        return self._info(row)

    def exists(self, chain_id: str) -> bool:
        return self.db.has_layer(chain_id)

    def list(self) -> list[LayerInfo]:
        return [self._info(r) for r in self.db.layers()]

    def diff_id_for(self, compressed_digest: str) -> str | None:
        """The diffID a compressed blob digest is known to decompress to."""
        return self.db.diff_id_for(compressed_digest)

    def chain(self, chain_id: str) -> list[str]:
        out = []
        cur: str | None = self.resolve(chain_id)
        while cur:
            out.append(cur)
            row = self.db.parent_of(cur)
            if not row:
                raise IntegrityError(f"layer {cur} is missing from the database")
            cur = row[0]
        return out[::-1]

    def entries(self, chain_id: str) -> Iterator[LayerEntry]:
        """This layer's members in tar order, metadata as the tar recorded it."""
        d = self.layer_dir(self.resolve(chain_id))
        for rec in entriesfile.read_records(d / ENTRIES):
            if rec[entriesfile.KIND] is not None:
                yield entriesfile.to_entry(rec)

    def check_present(self, chain_id: str) -> None:
        """IntegrityError unless every layer of the chain still has its directory and index."""
        for c in self.chain(chain_id):
            d = self.layer_dir(c)
            if not (d / "fs").is_dir() or not (d / TAR_SPLIT).is_file() or not (d / ENTRIES).is_file():
                raise IntegrityError(f"layer {c} is damaged: its directory or index is missing"
                                     " (`fusesnap fsck` reports it)")

    # -- import -------------------------------------------------------------------------------
    def import_tar(self, src: BinaryIO, parent: str | None = None, *,
                   labels: dict[str, str] | None = None,
                   donor: Callable[[bytes], str | None] | None = None,
                   retain: str | None = None) -> LayerInfo:
        """Import a plain/gzip/zstd layer tar in one streaming pass; idempotent per chainID.

        `retain=HOLDER` also retains the layer for HOLDER in the same transaction that
        makes it visible, so a concurrent gc cannot remove it before the caller's next step
        (a multi-layer pull retains each layer it imports, then releases them all).
        """
        with self.stage_tar(src, parent, donor=donor) as staged:
            with self.publish(staged, labels=labels, retain=retain):
                pass
        return self.get(staged.chain_id)

    def stage_tar(self, src: BinaryIO, parent: str | None = None, *,
                  donor: Callable[[bytes], str | None] | None = None) -> StagedLayer:
        """Build a layer from a tar in staging/ (nothing visible yet); publish() makes it a layer.

        donor(path) may return a host file whose content equals that regular-file member:
        it is renamed into the staging dir instead of written (commit offers hard links
        to its upper's files). Payload bytes are still read, hashed and CRC-checked."""
        if parent is not None:
            parent = self.get(parent).chain_id
        t0 = time.monotonic()
        stage, stage_lock = self.layout.new_staging()
        ls: LayerStream | None = None
        try:
            ls = LayerStream(src)
            stream = ByteStream(ls.next_chunk)
            parser = TarParser(stream)
            ex = Extractor(stage, donor)
            pipe = ExtractPipeline(ex)
            try:
                with open(stage / TAR_SPLIT, "wb") as tsf:
                    w = IndexWriter(tsf)
                    while (m := parser.next()) is not None:
                        w.segment(m.segment)
                        w.file(m.name, m.size, feed_member(pipe, m, stream))
                    w.segment(parser.end_segment)
                    for junk in stream.rest():
                        w.segment(junk)
                    w.close()
                pipe.finish()
            finally:
                pipe.abort()
                ex.close()
            members = ex.finish(stage / ENTRIES)
            diff_id = ls.diff_id
            chain = compute_chain_id(parent, diff_id)
            log.info("import: %d members, %d tar bytes (%s input) -> %s in %.2fs", members, ls.size,
                     ls.compression, chain, time.monotonic() - t0)
            return StagedLayer(stage, stage_lock, chain, diff_id, parent, ex.diff_size, ls.size, members,
                               ls.compressed_digest, ls.compressed_size)
        except BaseException:
            rmtree(stage)
            stage_lock.path.unlink(missing_ok=True)
            stage_lock.close()
            raise
        finally:
            if ls is not None:
                ls.close()

    @contextmanager
    def publish(self, staged: StagedLayer, *, labels: dict[str, str] | None = None,
                retain: str | None = None, claim: bool = False, note: dict | None = None) -> Iterator[Tx]:
        """Make a staged layer visible (or reuse the stored one of that chainID) in a transaction
        the caller's block runs in; if the block raises, nothing is published.

        `claim=True` records an intent before the directory is put in place, so that a
        crash before the transaction deletes it (commit: its files are links to an upper).
        `note` is kept in the new layer's layer.json (see layer_record)."""
        chain = staged.chain_id
        labels = dict(labels or {})
        name = labels.pop(NAME_LABEL, None)
        db = self.db
        target = self.layer_dir(chain)
        rel = self.layout.relative(target)
        crash_point("staged")
        with self.layout.chain_lock(chain):
            existing = db.has_layer(chain)
            intent = None
            if not existing:
                created = _now_rfc3339()
                comp = [(staged.compressed_digest, staged.compressed_size)] if staged.compressed_digest else []
                LayerRecord(chain, staged.diff_id, staged.parent, staged.diff_size, staged.tar_size, created,
                            comp, labels, [name] if name else [], dict(note or {})).write(staged.path)
                sync_tree(staged.path, staged.members)
                if target.exists() or target.is_symlink():  # left by a crash between rename and commit
                    self.layout.trash(target)
                    with db.tx() as t:
                        db.drop_intents_for(t, rel)
                if claim:
                    with db.tx() as t:
                        intent = db.add_intent(t, rel, "commit")
                crash_point("before-rename")
                os.rename(staged.path, target)
                fsync_dir(self.layers_dir)
                crash_point("after-rename")
            else:
                log.info("import: %s already stored, nothing to do", chain)
            try:
                with db.tx() as t:
                    if not existing:
                        db.insert_layer(t, chain, staged.diff_id, staged.parent, staged.diff_size,
                                        staged.tar_size, created)
                        if intent is not None:
                            db.drop_intent(t, intent)
                    for k, v in labels.items():
                        db.set_label(t, chain, k, v)
                    if name:
                        db.add_name(t, chain, name)
                    if staged.compressed_digest:
                        db.add_compressed(t, staged.compressed_digest, staged.diff_id, staged.compressed_size)
                    if retain:
                        db.add_ref(t, chain, retain, "retain")
                    yield t
            except BaseException:
                if not existing:  # nothing was published: take the directory back out
                    self.layout.trash(target)
                    if intent is not None:
                        with db.tx() as t:
                            db.drop_intent(t, intent)
                raise
        log.debug("import: %s stored", chain)

    def layer_record(self, chain_id: str) -> LayerRecord | None:
        """The layer.json a layer was published with (None for layers written before it existed)."""
        return LayerRecord.read(self.layer_dir(chain_id))

    # -- export -------------------------------------------------------------------------------
    def export(self, ref: str, dst: BinaryIO) -> None:
        """Write the layer's original tar to dst, byte for byte, verifying CRCs and the diffID."""
        info = self.get(ref)
        export_layer(self.layer_dir(info.chain_id), info.diff_id, dst, label=info.chain_id)

    # -- references, labels, names -------------------------------------------------------------
    def _add_ref(self, chain_id: str, holder: str, kind: str) -> None:
        chain = self.resolve(chain_id)
        with self.db.tx() as t:
            self.db.add_ref(t, chain, holder, kind)

    def _drop_ref(self, chain_id: str, holder: str, kind: str) -> None:
        chain = self.resolve(chain_id)
        with self.db.tx() as t:
            if not self.db.drop_ref(t, chain, holder, kind):
                raise NotFound(f"layer {chain} has no {kind} held by {holder!r}")

    def retain(self, chain_id: str, holder: str) -> None:
        """Protect a layer from gc (e.g. during a multi-layer pull) until release()."""
        self._add_ref(chain_id, holder, "retain")

    def release(self, chain_id: str, holder: str) -> None:
        self._drop_ref(chain_id, holder, "retain")

    def add_ref(self, chain_id: str, holder: str) -> None:
        """An external reference (e.g. a snapshot whose parent this is): blocks rm and gc."""
        self._add_ref(chain_id, holder, "ref")

    def drop_ref(self, chain_id: str, holder: str) -> None:
        self._drop_ref(chain_id, holder, "ref")

    def holders(self, prefix: str) -> list[tuple[str, str, str]]:
        """(chainID, holder, kind) of every reference or retain whose holder starts with prefix."""
        return self.db.holders(prefix)

    def drop_holder(self, holder: str) -> int:
        """Remove every reference and retain of one holder (fsck of a holder that is gone)."""
        with self.db.tx() as t:
            return self.db.drop_holder(t, holder)

    @contextmanager
    def transaction(self) -> Iterator["StoreTransaction"]:
        """One write transaction on metadata.db, for tables other packages keep there (image
        records) together with the layer references that must change with them."""
        with self.db.tx() as t:
            yield StoreTransaction(self.db, t)

    def set_labels(self, chain_id: str, labels: dict[str, str]) -> None:
        """Set (value str) or delete (value "") labels. `fusesnap.io/name` adds a name to the
        layer's names (AlreadyExists if another layer has it); "" removes all its names."""
        chain = self.resolve(chain_id)
        with self.db.tx() as t:
            for k, v in labels.items():
                if k == NAME_LABEL:
                    if v:
                        self.db.add_name(t, chain, v)
                    else:
                        self.db.drop_name(t, chain)
                else:
                    self.db.set_label(t, chain, k, v)

    def add_name(self, chain_id: str, name: str) -> None:
        """Another name for a layer (export, inspect, prepare accept it); AlreadyExists if taken."""
        chain = self.resolve(chain_id)
        with self.db.tx() as t:
            self.db.add_name(t, chain, name)

    def remove_name(self, chain_id: str, name: str) -> None:
        chain = self.resolve(chain_id)
        with self.db.tx() as t:
            self.db.drop_name(t, chain, name)

    # -- removal ------------------------------------------------------------------------------
    def remove(self, chain_id: str) -> None:
        """Delete a layer nothing references: its row and an intent in one transaction, then
        the directory (renamed into trash/ first), then the intent."""
        chain = self.resolve(chain_id)
        target = self.layer_dir(chain)
        with self.layout.chain_lock(chain):
            with self.db.tx() as t:
                why = self.db.why_in_use(t, chain)
                if why:
                    raise InUse(why)
                if not self.db.delete_layer(t, chain):
                    raise NotFound(f"no such layer: {chain_id}")
                intent = self.db.add_intent(t, self.layout.relative(target), "remove")
            log.info("rm: %s", chain)
            crash_point("rm-after-commit")
            self.layout.trash(target)
            with self.db.tx() as t:
                self.db.drop_intent(t, intent)

    def finish_intents(self) -> None:
        """Carry out pending intents of crashed operations (one query when there are none)."""
        if self.db.intents():
            replay_intents(self.layout, self.db, FsckReport(), True)

    def recover(self) -> FsckReport:
        """Finish or undo what crashed operations left (intents, dead staging dirs, trash)."""
        return recover(self.layout, self.db)

    def gc(self) -> list[str]:
        """Remove leftovers and every layer nothing needs: no children, refs, retains, name or gc.root label."""
        self.recover()
        removed: list[str] = []
        while True:
            progress = False
            for chain in self.db.gc_candidates():
                try:
                    self.remove(chain)
                except (InUse, NotFound):
                    continue
                removed.append(chain)
                progress = True
            if not progress:
                return removed

    # -- fsck ---------------------------------------------------------------------------------
    def fsck_leftovers(self, repair: bool) -> FsckReport:
        rep = FsckReport()
        replay_intents(self.layout, self.db, rep, repair)
        check_leftovers(self.layout, rep, repair)
        return rep

    def fsck(self, repair: bool = False) -> FsckReport:
        """Verify every layer's files against its index and every DB row against disk."""
        return fsck(self.layout, self.db, repair)
