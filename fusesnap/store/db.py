"""The store's SQLite database (metadata.db): every SQL statement about layers lives here.

One database holds the store's tables and those of the components built on it
(the snapshotter's records, an image index...), so that one transaction can
change both: a commit inserts the layer, its reference and the snapshot rows at
once, and no crash can leave one without the other. Components add their
tables through `add_schema` and run their own SQL through `tx()` / `query()`.

Rollback journal in PERSIST mode, not WAL: WAL's shared-memory index is a
memory-mapped file, and on a full disk with blocks smaller than a page,
touching a page SQLite extended with a one-byte write raises SIGBUS; a
rollback journal maps nothing. The journal file is kept and preallocated
(JOURNAL_RESERVE), so transactions that only delete still commit on a full
disk: removing layers frees space instead of failing.

Every sqlite3 error leaves this module as a one-line FusesnapError that names
the database file and says what to do (no space, damaged, busy).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import AlreadyExists, DamagedStore, DatabaseError, NotFound

NAME_LABEL = "fusesnap.io/name"
GC_ROOT_LABEL = "fusesnap.io/gc.root"
JOURNAL_RESERVE = 256 << 10  # bytes kept in the journal file: ~60 pages of deletions on a full disk
STORE_SCHEMA_VERSION = 2

STORE_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    chain_id  TEXT PRIMARY KEY,
    diff_id   TEXT NOT NULL,
    parent    TEXT REFERENCES layers(chain_id),
    diff_size INTEGER NOT NULL,
    size      INTEGER NOT NULL,
    tar_size  INTEGER NOT NULL,
    created   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS layers_parent ON layers(parent);
CREATE TABLE IF NOT EXISTS compressed_digests (
    digest   TEXT PRIMARY KEY,
    diff_id  TEXT NOT NULL,
    chain_id TEXT,
    size     INTEGER
);
CREATE INDEX IF NOT EXISTS compressed_by_chain ON compressed_digests(chain_id);
CREATE TABLE IF NOT EXISTS layer_refs (
    chain_id TEXT NOT NULL REFERENCES layers(chain_id),
    holder   TEXT NOT NULL,
    kind     TEXT NOT NULL CHECK (kind IN ('retain', 'ref')),
    PRIMARY KEY (chain_id, holder, kind)
);
CREATE INDEX IF NOT EXISTS refs_by_holder ON layer_refs(holder);
CREATE TABLE IF NOT EXISTS layer_labels (
    chain_id TEXT NOT NULL REFERENCES layers(chain_id),
    key      TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (chain_id, key)
);
CREATE INDEX IF NOT EXISTS labels_by_value ON layer_labels(key, value);
-- Names (what `export NAME` resolves): several per layer, each naming one layer.
CREATE TABLE IF NOT EXISTS layer_names (
    name     TEXT PRIMARY KEY,
    chain_id TEXT NOT NULL REFERENCES layers(chain_id),
    seq      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS names_by_chain ON layer_names(chain_id, seq);
-- Directories to delete once nobody owns them: written in the transaction that gives a
-- directory up (or before one is put in place), so recovery after a crash knows them.
CREATE TABLE IF NOT EXISTS intents (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    path   TEXT NOT NULL,
    reason TEXT NOT NULL
);
"""

# Names used to be a label (one per layer); schema 2 keeps them in layer_names.
_MIGRATE_NAMES = """
INSERT OR IGNORE INTO layer_names(name, chain_id, seq)
    SELECT value, chain_id, rowid FROM layer_labels WHERE key = 'fusesnap.io/name';
DELETE FROM layer_labels WHERE key = 'fusesnap.io/name';
"""

LAYER_COLS = "chain_id, diff_id, parent, diff_size, size, tar_size, created"


def _is_disk_full(path: Path) -> bool:
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (64 << 10)


class Tx:
    """The handle of one open transaction: statements whose errors come out as one line."""

    def __init__(self, db: "StoreDB") -> None:
        self._db = db

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        try:
            return self._db.conn.execute(sql, args)
        except sqlite3.Error as e:
            raise self._db.error(e) from None

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        try:
            self._db.conn.executemany(sql, rows)
        except sqlite3.Error as e:
            raise self._db.error(e) from None

    def one(self, sql: str, args: Sequence[Any] = ()) -> tuple | None:
        try:
            return self._db.conn.execute(sql, args).fetchone()
        except sqlite3.Error as e:
            raise self._db.error(e) from None

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        try:
            return self._db.conn.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise self._db.error(e) from None


class StoreDB:
    """metadata.db: connection, schema, transactions, and the store's queries."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._q = Tx(self)
        # Owner-only from the start. Only a file that is not there yet is opened here: closing
        # any descriptor of the database drops every POSIX lock this process holds on it, so
        # other threads' open transactions would lose theirs (SQLite then reports a lock that
        # never frees, or a disk I/O error).
        try:
            os.close(os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except OSError:
            pass  # there already (or sqlite3 reports why below)
        try:
            self.conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise DatabaseError(f"cannot open the store database {self.path}: {e}") from None
        try:
            c = self.conn
            c.execute("PRAGMA busy_timeout = 60000")
            c.execute("PRAGMA foreign_keys = ON")
            c.execute("PRAGMA mmap_size = 0")
            c.execute("PRAGMA synchronous = FULL")
            mode = c.execute("PRAGMA journal_mode = PERSIST").fetchone()[0]
            if mode != "persist":  # a WAL database another process still has open: next time
                c.execute("PRAGMA journal_mode").fetchone()
        except sqlite3.Error as e:
            self.conn.close()
            raise self.error(e) from None
        self.add_schema("store", STORE_SCHEMA_VERSION, STORE_SCHEMA, {2: _MIGRATE_NAMES})
        self._reserve_journal()

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # -- errors ------------------------------------------------------------------------------
    def error(self, e: sqlite3.Error) -> DatabaseError:
        """A one-line error for a sqlite3 error on this database."""
        name = getattr(e, "sqlite_errorname", "") or ""
        text = str(e)
        if name == "SQLITE_FULL" or (name.startswith("SQLITE_IOERR") and _is_disk_full(self.path)):
            return DatabaseError(f"no space left on device for the store database {self.path}"
                                 " (remove layers or snapshots, or free space elsewhere)")
        if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "malformed" in text or "not a database" in text:
            return DamagedStore(f"the store database {self.path} is damaged ({text});"
                                " `fusesnap fsck --repair` rebuilds it from the layers")
        if name.startswith("SQLITE_BUSY") or "locked" in text:
            return DatabaseError(f"the store database {self.path} stayed locked by another process ({text})")
        if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
            return DatabaseError(f"cannot write the store database {self.path} ({text})")
        return DatabaseError(f"store database {self.path}: {text}")

    # -- transactions and queries (for this module and the components sharing the database) ---
    @contextmanager
    def tx(self) -> Iterator[Tx]:
        """A write transaction (BEGIN IMMEDIATE: concurrent processes queue here), committed
        when the block ends, rolled back if it raises."""
        with self._lock:
            c = self.conn
            try:
                c.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise self.error(e) from None
            try:
                yield self._q
            except BaseException as exc:
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(exc, sqlite3.Error):
                    raise self.error(exc) from None
                raise
            try:
                c.execute("COMMIT")
            except sqlite3.Error as e:
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise self.error(e) from None

    def one(self, sql: str, args: Sequence[Any] = ()) -> tuple | None:
        with self._lock:
            return self._q.one(sql, args)

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._q.all(sql, args)

    @contextmanager
    def attached(self, path: Path, alias: str) -> Iterator[set[str]]:
        """Another database file attached as `alias` for the block (to copy rows from it);
        yields the names of its tables."""
        with self._lock:
            try:
                self.conn.execute(f"ATTACH DATABASE ? AS {alias}", (str(path),))
            except sqlite3.Error as e:
                raise DatabaseError(f"cannot read the database {path}: {e}") from None
            try:
                tables = {r[0] for r in self.conn.execute(f"SELECT name FROM {alias}.sqlite_master"
                                                          " WHERE type='table'")}
                yield tables
            except sqlite3.Error as e:
                raise DatabaseError(f"cannot read the database {path}: {e}") from None
            finally:
                try:
                    self.conn.execute(f"DETACH DATABASE {alias}")
                except sqlite3.Error:
                    pass

    def add_schema(self, component: str, version: int, sql: str,
                   migrations: dict[int, str] | None = None) -> None:
        """Create (or upgrade to `version`) the tables of `component` in this database.

        The public hook for components built on the store (snapshots, images): `sql` is
        idempotent DDL (CREATE ... IF NOT EXISTS); `migrations[v]` runs once when a database
        below version v is opened, after `sql`, and must also be harmless on tables `sql`
        just created (databases from before schema_versions existed count as version 0).
        Costs one read when the schema is current."""
        try:
            row = self.conn.execute("SELECT version FROM schema_versions WHERE component=?",
                                    (component,)).fetchone()
            if row is not None and row[0] >= version:
                return
        except sqlite3.OperationalError:
            pass  # no schema_versions table yet
        except sqlite3.Error as e:
            raise self.error(e) from None
        with self.tx() as t:
            t.execute("CREATE TABLE IF NOT EXISTS schema_versions (component TEXT PRIMARY KEY,"
                      " version INTEGER NOT NULL)")
            row = t.one("SELECT version FROM schema_versions WHERE component=?", (component,))
            have = row[0] if row else 0
            if have >= version:
                return
            for stmt in _statements(sql):
                t.execute(stmt)
            for v in range(have + 1, version + 1):
                for stmt in _statements((migrations or {}).get(v, "")):
                    t.execute(stmt)
            t.execute("INSERT OR REPLACE INTO schema_versions(component, version) VALUES (?,?)",
                      (component, version))

    def _reserve_journal(self) -> None:
        """Keep JOURNAL_RESERVE bytes allocated to the journal (SQLite reuses a journal whose
        header is zero), so deletions can commit when the disk is full."""
        journal = Path(f"{self.path}-journal")
        try:
            if journal.stat().st_size >= JOURNAL_RESERVE:
                return
        except FileNotFoundError:
            pass
        except OSError:
            return
        try:
            fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, JOURNAL_RESERVE)
        except OSError:
            pass  # no space right now, or no fallocate here: deletions may then need space
        finally:
            os.close(fd)

    def quick_check(self) -> list[str]:
        """SQLite's own consistency check: [] when the database file is sound."""
        rows = self.all("PRAGMA quick_check")
        return [] if rows == [("ok",)] else [r[0] for r in rows]

    # -- layers ------------------------------------------------------------------------------
    def layer(self, chain: str) -> tuple | None:
        return self.one(f"SELECT {LAYER_COLS} FROM layers WHERE chain_id=?", (chain,))

    def layers(self) -> list[tuple]:
        return self.all(f"SELECT {LAYER_COLS} FROM layers ORDER BY created, chain_id")

    def has_layer(self, chain: str) -> bool:
        return self.one("SELECT 1 FROM layers WHERE chain_id=?", (chain,)) is not None

    def parent_of(self, chain: str) -> tuple | None:
        """(parent,) of a layer, None when there is no such row."""
        return self.one("SELECT parent FROM layers WHERE chain_id=?", (chain,))

    def chains_named(self, name: str) -> list[str]:
        return [r[0] for r in self.all("SELECT chain_id FROM layer_names WHERE name=?", (name,))]

    def chains_with_prefix(self, hx: str) -> list[str]:
        rows = self.all("SELECT chain_id FROM layers WHERE chain_id >= ? AND chain_id < ? LIMIT 2",
                        ("sha256:" + hx, "sha256:" + hx + "g"))
        return [r[0] for r in rows]

    def details(self, chain: str, diff: str) -> tuple[int, dict[str, str], list[str], list[str]]:
        """(references + children, labels, names, compressed digests) of one layer."""
        with self._lock:
            q = self._q
            refs = q.one("SELECT COUNT(*) FROM layer_refs WHERE chain_id=?", (chain,))[0]
            kids = q.one("SELECT COUNT(*) FROM layers WHERE parent=?", (chain,))[0]
            labels = dict(q.all("SELECT key, value FROM layer_labels WHERE chain_id=? ORDER BY key", (chain,)))
            names = [r[0] for r in q.all("SELECT name FROM layer_names WHERE chain_id=? ORDER BY seq", (chain,))]
            comp = [r[0] for r in q.all("SELECT digest FROM compressed_digests WHERE diff_id=? ORDER BY digest",
                                        (diff,))]
        return refs + kids, labels, names, comp

    def diff_id_for(self, compressed_digest: str) -> str | None:
        row = self.one("SELECT diff_id FROM compressed_digests WHERE digest=?", (compressed_digest,))
        return row[0] if row else None

    def gc_candidates(self) -> list[str]:
        """Layers nothing needs: no child, reference, retain, name or gc.root label."""
        rows = self.all(
            "SELECT chain_id FROM layers l WHERE"
            " NOT EXISTS (SELECT 1 FROM layers k WHERE k.parent = l.chain_id) AND"
            " NOT EXISTS (SELECT 1 FROM layer_refs r WHERE r.chain_id = l.chain_id) AND"
            " NOT EXISTS (SELECT 1 FROM layer_names n WHERE n.chain_id = l.chain_id) AND"
            " NOT EXISTS (SELECT 1 FROM layer_labels b WHERE b.chain_id = l.chain_id AND b.key = ?)",
            (GC_ROOT_LABEL,))
        return [r[0] for r in rows]

    def holders(self, prefix: str) -> list[tuple[str, str, str]]:
        """(chain, holder, kind) of every reference whose holder starts with `prefix`."""
        return self.all("SELECT chain_id, holder, kind FROM layer_refs WHERE holder >= ? AND holder < ?"
                        " ORDER BY chain_id, holder", (prefix, prefix + "\U0010ffff"))

    # -- layer writes (inside tx()) ----------------------------------------------------------
    @staticmethod
    def insert_layer(t: Tx, chain: str, diff: str, parent: str | None, diff_size: int, tar_size: int,
                     created: str) -> None:
        psize = 0
        if parent is not None:
            row = t.one("SELECT size FROM layers WHERE chain_id=?", (parent,))
            if row is None:
                raise NotFound(f"parent layer {parent} was removed during the import")
            psize = row[0]
        t.execute(f"INSERT INTO layers({LAYER_COLS}) VALUES (?,?,?,?,?,?,?)",
                  (chain, diff, parent, diff_size, psize + diff_size, tar_size, created))

    @staticmethod
    def add_compressed(t: Tx, digest: str, diff: str, size: int) -> None:
        t.execute("INSERT OR IGNORE INTO compressed_digests(digest, diff_id, size) VALUES (?,?,?)",
                  (digest, diff, size))

    @staticmethod
    def set_label(t: Tx, chain: str, key: str, value: str) -> None:
        if value == "":
            t.execute("DELETE FROM layer_labels WHERE chain_id=? AND key=?", (chain, key))
        else:
            t.execute("INSERT OR REPLACE INTO layer_labels(chain_id, key, value) VALUES (?,?,?)", (chain, key, value))

    @staticmethod
    def add_name(t: Tx, chain: str, name: str) -> None:
        """Give layer `chain` the name (a no-op if it has it); AlreadyExists if another layer has it."""
        row = t.one("SELECT chain_id FROM layer_names WHERE name=?", (name,))
        if row is not None:
            if row[0] != chain:
                raise AlreadyExists(f"name {name!r} is already used by layer {row[0]}")
            return
        seq = t.one("SELECT COALESCE(MAX(seq), 0) + 1 FROM layer_names")[0]
        t.execute("INSERT INTO layer_names(name, chain_id, seq) VALUES (?,?,?)", (name, chain, seq))

    @staticmethod
    def drop_name(t: Tx, chain: str, name: str | None = None) -> None:
        """Remove one name of a layer (or all its names when name is None)."""
        if name is None:
            t.execute("DELETE FROM layer_names WHERE chain_id=?", (chain,))
        else:
            t.execute("DELETE FROM layer_names WHERE chain_id=? AND name=?", (chain, name))

    @staticmethod
    def add_ref(t: Tx, chain: str, holder: str, kind: str) -> None:
        t.execute("INSERT OR IGNORE INTO layer_refs(chain_id, holder, kind) VALUES (?,?,?)", (chain, holder, kind))

    @staticmethod
    def drop_ref(t: Tx, chain: str, holder: str, kind: str) -> bool:
        """False when there was no such reference."""
        cur = t.execute("DELETE FROM layer_refs WHERE chain_id=? AND holder=? AND kind=?", (chain, holder, kind))
        return cur.rowcount > 0

    @staticmethod
    def drop_holder(t: Tx, holder: str) -> int:
        """Remove every reference of one holder; returns how many there were."""
        return t.execute("DELETE FROM layer_refs WHERE holder=?", (holder,)).rowcount

    @staticmethod
    def drop_retains(t: Tx, holder: str) -> None:
        """Drop every retain one holder has (e.g. all layers of a pull once its record exists)."""
        t.execute("DELETE FROM layer_refs WHERE holder=? AND kind='retain'", (holder,))

    @staticmethod
    def retain_holders(t: Tx, prefix: str) -> list[str]:
        """Holders of retains whose name starts with `prefix` (to find those of dead processes)."""
        rows = t.all("SELECT DISTINCT holder FROM layer_refs WHERE kind='retain' AND substr(holder, 1, ?)=?"
                     " ORDER BY holder", (len(prefix), prefix))
        return [r[0] for r in rows]

    @staticmethod
    def why_in_use(t: Tx, chain: str) -> str | None:
        """What keeps a layer from being removed (a child or a reference), or None."""
        kid = t.one("SELECT chain_id FROM layers WHERE parent=? LIMIT 1", (chain,))
        if kid:
            return f"layer {chain} is the parent of {kid[0]}"
        ref = t.one("SELECT kind, holder FROM layer_refs WHERE chain_id=? ORDER BY kind, holder LIMIT 1", (chain,))
        if ref:
            return f"layer {chain} is referenced ({ref[0]} by {ref[1]!r})"
        return None

    @staticmethod
    def delete_layer(t: Tx, chain: str) -> bool:
        """Delete a layer's row and everything hanging off it; False when there was no row."""
        diff = t.one("SELECT diff_id FROM layers WHERE chain_id=?", (chain,))
        if diff is None:
            return False
        t.execute("DELETE FROM layer_labels WHERE chain_id=?", (chain,))
        t.execute("DELETE FROM layer_names WHERE chain_id=?", (chain,))
        t.execute("DELETE FROM layers WHERE chain_id=?", (chain,))
        if not t.one("SELECT 1 FROM layers WHERE diff_id=?", (diff[0],)):
            t.execute("DELETE FROM compressed_digests WHERE diff_id=?", (diff[0],))
        return True

    # -- intents -----------------------------------------------------------------------------
    @staticmethod
    def add_intent(t: Tx, path: str, reason: str) -> int:
        return int(t.execute("INSERT INTO intents(path, reason) VALUES (?,?)", (path, reason)).lastrowid)

    @staticmethod
    def drop_intent(t: Tx, intent_id: int) -> None:
        t.execute("DELETE FROM intents WHERE id=?", (intent_id,))

    @staticmethod
    def drop_intents_for(t: Tx, path: str) -> None:
        t.execute("DELETE FROM intents WHERE path=?", (path,))

    def intents(self) -> list[tuple[int, str, str]]:
        return self.all("SELECT id, path, reason FROM intents ORDER BY id")

    def intent_paths(self) -> set[str]:
        return {r[0] for r in self.all("SELECT path FROM intents")}


def probe(path: Path) -> str | None:
    """Why the database file at `path` cannot be used (damaged), or None when SQLite finds it sound."""
    try:
        conn = sqlite3.connect(path, timeout=60.0)
    except sqlite3.Error as e:
        return str(e)
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.Error as e:
        return str(e)
    finally:
        conn.close()
    if rows == [("ok",)]:
        return None
    return "; ".join(r[0] for r in rows[:3])


def _statements(sql: str) -> list[str]:
    """Split DDL on ';' (no statement here contains one inside a literal)."""
    out = []
    for part in sql.split(";"):
        lines = [ln for ln in part.splitlines() if not ln.strip().startswith("--")]
        stmt = "\n".join(lines).strip()
        if stmt:
            out.append(stmt)
    return out

