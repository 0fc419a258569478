"""LayerStore: content-addressed layers keyed by chainID (see docs/ARCHITECTURE.md "Store API").

Layout under the root: metadata.db (SQLite WAL), layers/<hex>/{fs/, shadow/,
tar-split.json.zst, entries.json.zst}, staging/<rand>/ (+ <rand>.lock held while an
import is alive), trash/, locks/<hex>.lock (per-chainID flock).

Import is atomic: everything is built in staging/, made durable (one syncfs, or per-file
fsync for small layers), renamed to layers/<hex> under the chainID lock, then the DB
row is committed. A crash leaves at worst a staging dir or a layer dir without a row;
fsck --repair removes both.
"""

from __future__ import annotations

import logging
import os
import time
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from ..digest import chain_id as compute_chain_id, hex_of, is_digest
from ..errors import AlreadyExists, InUse, IntegrityError, InvalidInput, NotFound
from ..layerentry import LayerEntry
from ..linux import libc
from ..tarsplit.index import IndexWriter
from ..tarsplit.parser import TarParser
from ..tarsplit.stream import ByteStream
from . import db as dbm
from . import entriesfile
from .decompress import LayerStream
from .exporter import export_layer
from .extract import Extractor, feed_member
from .pipeline import ExtractPipeline
from .locks import FileLock

log = logging.getLogger("fusesnap.store")

NAME_LABEL = "fusesnap.io/name"
GC_ROOT_LABEL = "fusesnap.io/gc.root"
TAR_SPLIT = "tar-split.json.zst"
ENTRIES = "entries.json.zst"

def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding `path` once (cheaper than fsync per file)."""
    if os.environ.get("FUSESNAP_NO_SYNC") == "1":
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            libc.syncfs(fd)
        except OSError:
            os.fsync(fd)
    finally:
        os.close(fd)


SMALL_LAYER = 256  # members: below this, fsync each file instead of syncfs() of the whole fs


def sync_tree(path: Path, members: int) -> None:
    """Make a staged layer durable: fsync each file and dir of a small layer, syncfs() a big one.

    syncfs waits for every dirty page of the filesystem (other processes' too), which
    is the cheap way for a big layer but slow for a snapshot commit of a few files.
    """
    if os.environ.get("FUSESNAP_NO_SYNC") == "1":
        return
    if members >= SMALL_LAYER:
        syncfs(path)
        return
    for dirpath, dirnames, filenames in os.walk(path):
        for n in filenames:
            p = os.path.join(dirpath, n)
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue  # a symlink
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def crash_point(name: str) -> None:
    """Test hook: FUSESNAP_CRASH_AT=<name> kills this process with SIGKILL at that point of an import."""
    if os.environ.get("FUSESNAP_CRASH_AT") == name:
        os.kill(os.getpid(), 9)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rmtree(path: Path) -> None:
    """Remove a tree we created; make directories writable first if needed."""
    def onerror(func: Any, p: str, exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except FileNotFoundError:
            pass

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=onerror)


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
    labels: dict[str, str] = field(default_factory=dict)
    tar_size: int = 0  # bytes of the uncompressed tar (what export writes)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class StoreTransaction:
    """What LayerStore.transaction() hands out: SQL on the caller's own tables, and
    reference changes on layers that commit or roll back with it."""

    def __init__(self, conn: Any) -> None:
        self._c = conn

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self._c.execute(sql, params)

    def add_ref(self, chain_id: str, holder: str) -> None:
        if self._c.execute("SELECT 1 FROM layers WHERE chain_id=?", (chain_id,)).fetchone() is None:
            raise NotFound(f"no such layer: {chain_id}")
        self._c.execute("INSERT OR IGNORE INTO layer_refs(chain_id, holder, kind) VALUES (?,?,'ref')",
                        (chain_id, holder))

    def drop_ref(self, chain_id: str, holder: str) -> None:
        self._c.execute("DELETE FROM layer_refs WHERE chain_id=? AND holder=? AND kind='ref'", (chain_id, holder))

    def release_all(self, holder: str) -> None:
        """Drop every retain `holder` has (e.g. all layers of a pull once its record exists)."""
        self._c.execute("DELETE FROM layer_refs WHERE holder=? AND kind='retain'", (holder,))

    def retain_holders(self, prefix: str) -> list[str]:
        """Holders of retains whose name starts with `prefix` (to find those of dead processes)."""
        rows = self._c.execute("SELECT DISTINCT holder FROM layer_refs WHERE kind='retain' AND substr(holder, 1, ?)=?"
                               " ORDER BY holder", (len(prefix), prefix)).fetchall()
        return [r[0] for r in rows]


@dataclass
class FsckReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"checked": self.checked, "problems": self.problems, "repaired": self.repaired, "ok": self.ok}


class LayerStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        for d in ("layers", "staging", "trash", "locks"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.layers_dir = self.root / "layers"
        self.staging_dir = self.root / "staging"
        self.trash_dir = self.root / "trash"
        self.locks_dir = self.root / "locks"
        self._lock = threading.RLock()
        self.conn = dbm.connect(self.root / "metadata.db")

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def __enter__(self) -> "LayerStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths & locks ------------------------------------------------------------------------
    def layer_dir(self, chain_id: str) -> Path:
        return self.layers_dir / hex_of(chain_id)

    def fs_dir(self, chain_id: str) -> Path:
        return self.layer_dir(self.get(chain_id).chain_id) / "fs"

    def _chain_lock(self, chain_id: str, blocking: bool = True) -> FileLock:
        return FileLock(self.locks_dir / f"{hex_of(chain_id)}.lock", blocking)

    # -- queries ------------------------------------------------------------------------------
    def _resolve(self, ref: str) -> str:
        """chainID for a chainID, its bare hex, a unique hex prefix (>= 12) or a name label."""
        c = self.conn
        with self._lock:
            if is_digest(ref):
                row = c.execute("SELECT chain_id FROM layers WHERE chain_id=?", (ref,)).fetchone()
                if row:
                    return row[0]
            row = c.execute("SELECT chain_id FROM layer_labels WHERE key=? AND value=? ORDER BY chain_id",
                            (NAME_LABEL, ref)).fetchall()
            if len(row) == 1:
                return row[0][0]
            if len(row) > 1:
                raise InvalidInput(f"name {ref!r} is ambiguous ({len(row)} layers carry it)")
            hx = ref[7:] if ref.startswith("sha256:") else ref
            if 12 <= len(hx) <= 64 and all(ch in "0123456789abcdef" for ch in hx):
                rows = c.execute("SELECT chain_id FROM layers WHERE chain_id >= ? AND chain_id < ? LIMIT 2",
                                 ("sha256:" + hx, "sha256:" + hx + "g")).fetchall()
                if len(rows) == 1:
                    return rows[0][0]
                if len(rows) > 1:
                    raise InvalidInput(f"layer reference {ref!r} is ambiguous")
        raise NotFound(f"no such layer: {ref}")

    def _info(self, row: tuple[Any, ...]) -> LayerInfo:
        chain, diff, parent, diff_size, size, tar_size, created = row
        c = self.conn
        refs = c.execute("SELECT COUNT(*) FROM layer_refs WHERE chain_id=?", (chain,)).fetchone()[0]
        kids = c.execute("SELECT COUNT(*) FROM layers WHERE parent=?", (chain,)).fetchone()[0]
        labels = dict(c.execute("SELECT key, value FROM layer_labels WHERE chain_id=? ORDER BY key", (chain,)))
        comp = [r[0] for r in c.execute("SELECT digest FROM compressed_digests WHERE diff_id=? ORDER BY digest", (diff,))]
        return LayerInfo(chain, diff, parent, size, diff_size, created, comp, refs + kids, labels, tar_size)

    _COLS = "chain_id, diff_id, parent, diff_size, size, tar_size, created"

    def get(self, ref: str) -> LayerInfo:
        chain = self._resolve(ref)
        with self._lock:
            row = self.conn.execute(f"SELECT {self._COLS} FROM layers WHERE chain_id=?", (chain,)).fetchone()
            if not row:
                raise NotFound(f"no such layer: {ref}")
            return self._info(row)

    def exists(self, chain_id: str) -> bool:
        with self._lock:
            return self.conn.execute("SELECT 1 FROM layers WHERE chain_id=?", (chain_id,)).fetchone() is not None

    def list(self) -> list[LayerInfo]:
        with self._lock:
            rows = self.conn.execute(f"SELECT {self._COLS} FROM layers ORDER BY created, chain_id").fetchall()
            return [self._info(r) for r in rows]

    def diff_id_for(self, compressed_digest: str) -> str | None:
        """The diffID a compressed blob digest is known to decompress to."""
        with self._lock:
            row = self.conn.execute("SELECT diff_id FROM compressed_digests WHERE digest=?",
                                    (compressed_digest,)).fetchone()
            return row[0] if row else None

    def chain(self, chain_id: str) -> list[str]:
        out = []
        cur: str | None = self._resolve(chain_id)
        with self._lock:
            while cur:
                out.append(cur)
                row = self.conn.execute("SELECT parent FROM layers WHERE chain_id=?", (cur,)).fetchone()
                if not row:
                    raise IntegrityError(f"layer {cur} is missing from the database")
                cur = row[0]
        return out[::-1]

    def entries(self, chain_id: str) -> Iterator[LayerEntry]:
        """This layer's members in tar order, metadata as the tar recorded it."""
        d = self.layer_dir(self._resolve(chain_id))
        for rec in entriesfile.read_records(d / ENTRIES):
            if rec[entriesfile.KIND] is not None:
                yield entriesfile.to_entry(rec)

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
        if parent is not None:
            parent = self.get(parent).chain_id
        t0 = time.monotonic()
        stage, stage_lock = self._new_staging()
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
            entriesfile.write_entries(stage / ENTRIES, ex.records)
            diff_id = ls.diff_id
            chain = compute_chain_id(parent, diff_id)
            log.info("import: %d members, %d tar bytes (%s input) -> %s in %.2fs", len(ex.records), ls.size,
                     ls.compression, chain, time.monotonic() - t0)
            crash_point("staged")
            sync_tree(stage, len(ex.records))
            with self._chain_lock(chain):
                if not self.exists(chain):
                    target = self.layer_dir(chain)
                    if target.exists():  # leftover of a crash between rename and commit
                        self._trash(target)
                    crash_point("before-rename")
                    os.rename(stage, target)
                    fsync_dir(self.layers_dir)
                    crash_point("after-rename")
                    log.debug("import: %s stored", chain)
                    try:
                        self._insert(chain, diff_id, parent, ex.diff_size, ls, labels, retain)
                    except BaseException:
                        self._trash(target)  # e.g. the parent was removed meanwhile: no row-less dir
                        raise
                else:
                    log.info("import: %s already stored, nothing to do", chain)
                    if labels:
                        self.set_labels(chain, labels)
                    with self._lock, dbm.Tx(self.conn) as c:
                        self._add_compressed(c, diff_id, ls)
                        if retain:
                            self._ref_row(c, chain, retain, "retain")
            return self.get(chain)
        finally:
            if ls is not None:
                ls.close()
            if stage.exists():
                rmtree(stage)
            stage_lock.path.unlink(missing_ok=True)
            stage_lock.close()

    def _new_staging(self) -> tuple[Path, FileLock]:
        name = secrets.token_hex(8)
        lock = FileLock(self.staging_dir / f"{name}.lock")
        stage = self.staging_dir / name
        stage.mkdir(mode=0o755)
        return stage, lock

    @staticmethod
    def _add_compressed(c: Any, diff_id: str, ls: LayerStream) -> None:
        if ls.compressed_digest:
            c.execute("INSERT OR IGNORE INTO compressed_digests(digest, diff_id, size) VALUES (?,?,?)",
                      (ls.compressed_digest, diff_id, ls.compressed_size))

    def _insert(self, chain: str, diff_id: str, parent: str | None, diff_size: int, ls: LayerStream,
                labels: dict[str, str] | None, retain: str | None = None) -> None:
        tar_size = ls.size
        created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with self._lock, dbm.Tx(self.conn) as c:
            psize = 0
            if parent is not None:
                row = c.execute("SELECT size FROM layers WHERE chain_id=?", (parent,)).fetchone()
                if row is None:
                    raise NotFound(f"parent layer {parent} was removed during the import")
                psize = row[0]
            c.execute("INSERT INTO layers(chain_id, diff_id, parent, diff_size, size, tar_size, created)"
                      " VALUES (?,?,?,?,?,?,?)", (chain, diff_id, parent, diff_size, psize + diff_size, tar_size, created))
            for k, v in (labels or {}).items():
                if k == NAME_LABEL:
                    self._check_name_free(c, v, chain)
                c.execute("INSERT OR REPLACE INTO layer_labels(chain_id, key, value) VALUES (?,?,?)", (chain, k, v))
            self._add_compressed(c, diff_id, ls)
            if retain:
                self._ref_row(c, chain, retain, "retain")

    # -- export -------------------------------------------------------------------------------
    def export(self, ref: str, dst: BinaryIO) -> None:
        """Write the layer's original tar to dst, byte for byte, verifying CRCs and the diffID."""
        info = self.get(ref)
        export_layer(self.layer_dir(info.chain_id), info.diff_id, dst, label=info.chain_id)

    # -- references, labels -------------------------------------------------------------------
    @staticmethod
    def _ref_row(c: Any, chain: str, holder: str, kind: str) -> None:
        c.execute("INSERT OR IGNORE INTO layer_refs(chain_id, holder, kind) VALUES (?,?,?)", (chain, holder, kind))

    def _add_ref(self, chain_id: str, holder: str, kind: str) -> None:
        chain = self._resolve(chain_id)
        with self._lock, dbm.Tx(self.conn) as c:
            self._ref_row(c, chain, holder, kind)

    def _drop_ref(self, chain_id: str, holder: str, kind: str) -> None:
        chain = self._resolve(chain_id)
        with self._lock, dbm.Tx(self.conn) as c:
            cur = c.execute("DELETE FROM layer_refs WHERE chain_id=? AND holder=? AND kind=?", (chain, holder, kind))
            if cur.rowcount == 0:
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

    @contextmanager
    def transaction(self) -> Iterator["StoreTransaction"]:
        """One IMMEDIATE transaction on metadata.db, for tables other packages keep there
        (image records) together with the layer references that must change with them."""
        with self._lock, dbm.Tx(self.conn) as c:
            yield StoreTransaction(c)

    @staticmethod
    def _check_name_free(c: Any, name: str, chain: str) -> None:
        other = c.execute("SELECT chain_id FROM layer_labels WHERE key=? AND value=? AND chain_id<>?",
                          (NAME_LABEL, name, chain)).fetchone()
        if other:
            raise AlreadyExists(f"name {name!r} is already used by layer {other[0]}")

    def set_labels(self, chain_id: str, labels: dict[str, str]) -> None:
        """Set (value str) or delete (value "") labels."""
        chain = self._resolve(chain_id)
        with self._lock, dbm.Tx(self.conn) as c:
            for k, v in labels.items():
                if k == NAME_LABEL and v:
                    self._check_name_free(c, v, chain)
                if v == "":
                    c.execute("DELETE FROM layer_labels WHERE chain_id=? AND key=?", (chain, k))
                else:
                    c.execute("INSERT OR REPLACE INTO layer_labels(chain_id, key, value) VALUES (?,?,?)", (chain, k, v))

    # -- removal ------------------------------------------------------------------------------
    def remove(self, chain_id: str) -> None:
        """Delete a layer nothing references: DB row first, then rename into trash/, then delete."""
        chain = self._resolve(chain_id)
        with self._chain_lock(chain):
            with self._lock, dbm.Tx(self.conn) as c:
                kids = c.execute("SELECT chain_id FROM layers WHERE parent=? LIMIT 1", (chain,)).fetchone()
                if kids:
                    raise InUse(f"layer {chain} is the parent of {kids[0]}")
                refs = c.execute("SELECT kind, holder FROM layer_refs WHERE chain_id=? LIMIT 1", (chain,)).fetchone()
                if refs:
                    raise InUse(f"layer {chain} is referenced ({refs[0]} by {refs[1]!r})")
                diff = c.execute("SELECT diff_id FROM layers WHERE chain_id=?", (chain,)).fetchone()
                if diff is None:
                    raise NotFound(f"no such layer: {chain_id}")
                c.execute("DELETE FROM layer_labels WHERE chain_id=?", (chain,))
                c.execute("DELETE FROM layers WHERE chain_id=?", (chain,))
                if not c.execute("SELECT 1 FROM layers WHERE diff_id=?", (diff[0],)).fetchone():
                    c.execute("DELETE FROM compressed_digests WHERE diff_id=?", (diff[0],))
            log.info("rm: %s", chain)
            crash_point("rm-after-commit")
            self._trash(self.layer_dir(chain))

    def _trash(self, path: Path) -> None:
        if not path.exists():
            return
        t = self.trash_dir / f"{path.name}-{secrets.token_hex(4)}"
        os.rename(path, t)
        crash_point("in-trash")
        rmtree(t)

    def gc(self) -> list[str]:
        """Remove leftovers and every layer nothing needs: no children, refs, retains, name or gc.root label."""
        self.fsck_leftovers(repair=True)
        removed: list[str] = []
        while True:
            with self._lock:
                rows = self.conn.execute(
                    "SELECT chain_id FROM layers l WHERE"
                    " NOT EXISTS (SELECT 1 FROM layers k WHERE k.parent = l.chain_id) AND"
                    " NOT EXISTS (SELECT 1 FROM layer_refs r WHERE r.chain_id = l.chain_id) AND"
                    " NOT EXISTS (SELECT 1 FROM layer_labels b WHERE b.chain_id = l.chain_id AND b.key IN (?, ?))",
                    (NAME_LABEL, GC_ROOT_LABEL)).fetchall()
            progress = False
            for (chain,) in rows:
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
        from .fsck import check_leftovers
        rep = FsckReport()
        check_leftovers(self, rep, repair)
        return rep

    def fsck(self, repair: bool = False) -> FsckReport:
        """Verify every layer's files against its index and every DB row against disk."""
        from .fsck import fsck
        return fsck(self, repair)
