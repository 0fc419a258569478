"""Snapshot records: their tables in the store's database (metadata.db) and every SQL statement about them.

Only explicit snapshots live here: active ones, views, and committed names
given by `commit`. Store layers that nobody named are committed snapshots too
(named by their chainID); the snapshotter merges both views. Timestamps are
integer nanoseconds so created == updated holds exactly until an update.

Sharing the store's database is what makes a commit one transaction: the layer
row, its reference, the committed record and the removal of the active one
commit together (StoreDB.tx()). Stores written before that kept these tables in
snapshots.db; its rows move into metadata.db the first time it is opened.
"""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from ..store.db import StoreDB, Tx
from ..store.layout import DB_FILE

Kind = Literal["active", "view", "committed"]
KINDS: tuple[Kind, ...] = ("active", "view", "committed")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT NOT NULL UNIQUE,
    kind         TEXT NOT NULL CHECK (kind IN ('active', 'view', 'committed')),
    parent       TEXT NOT NULL DEFAULT '',   -- parent snapshot name, '' for none
    parent_chain TEXT,                       -- chainID of the parent, NULL for none
    chain_id     TEXT,                       -- committed: the layer this name stands for
    holder       TEXT NOT NULL,              -- store reference held on chain_id or parent_chain
    created_ns   INTEGER NOT NULL,
    updated_ns   INTEGER NOT NULL,
    idmap        TEXT                        -- active: the user namespace it was mounted in (IdMap JSON)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
CREATE INDEX IF NOT EXISTS snapshots_chain ON snapshots(chain_id);
CREATE INDEX IF NOT EXISTS snapshots_holder ON snapshots(holder);
CREATE TABLE IF NOT EXISTS snapshot_labels (
    snapshot_id INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, key)
);
-- Update times of unnamed layer snapshots (their labels live in the store).
CREATE TABLE IF NOT EXISTS layer_updates (
    chain_id   TEXT PRIMARY KEY,
    updated_ns INTEGER NOT NULL
);
"""
OLD_DB_NAME = "snapshots.db"



def now_ns() -> int:
    return time.time_ns()


def format_ns(ns: int) -> str:
    """RFC 3339 UTC with nanoseconds, as containerd prints timestamps."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(secs, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{frac:09d}Z"


def parse_rfc3339_ns(text: str) -> int:
    """Inverse of format_ns; also accepts second or microsecond precision and offsets."""
    t = text.strip()
    frac_ns = 0
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    main, sep, rest = t.partition(".")
    tz = ""
    if sep:
        digits = ""
        for i, ch in enumerate(rest):
            if not ch.isdigit():
                tz = rest[i:]
                break
            digits += ch
        frac_ns = int((digits + "000000000")[:9]) if digits else 0
    else:
        # offset follows the seconds directly
        for i in range(len(main) - 1, 9, -1):
            if main[i] in "+-":
                main, tz = main[:i], main[i:]
                break
    dt = datetime.fromisoformat(main + (tz or "+00:00"))
    return int(dt.timestamp()) * 1_000_000_000 + frac_ns


@dataclass
class Record:
    """One explicit snapshot row."""

    id: int
    name: str
    kind: Kind
    parent: str
    parent_chain: str | None
    chain_id: str | None
    holder: str
    created_ns: int
    updated_ns: int
    idmap: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


class SnapshotDB:
    """The snapshot tables of one store database: reads here, writes as static methods that
    take the transaction handle (so the snapshotter can combine them with store writes)."""

    def __init__(self, db: StoreDB, root: Path) -> None:
        self.db = db
        db.add_schema("snapshots", SCHEMA_VERSION, _SCHEMA)
        old = Path(root) / OLD_DB_NAME
        if old.exists():
            self._adopt(old)

    def _adopt(self, old: Path) -> None:
        """Move the rows of a separate snapshots.db (older stores) into this database, once."""
        with self.db.attached(old, "old") as tables:
            if "snapshots" in tables:
                with self.db.tx() as t:
                    if t.one("SELECT COUNT(*) FROM snapshots")[0] == 0:
                        cols = {r[1] for r in t.all("PRAGMA old.table_info(snapshots)")}
                        holder = "holder" if "holder" in cols else "'snapshot:' || name"
                        t.execute("INSERT INTO snapshots (id, name, kind, parent, parent_chain, chain_id, holder,"
                                  f" created_ns, updated_ns) SELECT id, name, kind, parent, parent_chain, chain_id,"
                                  f" {holder}, created_ns, updated_ns FROM old.snapshots")
                        t.execute("INSERT INTO snapshot_labels (snapshot_id, key, value)"
                                  " SELECT snapshot_id, key, value FROM old.snapshot_labels")
                        if "layer_updates" in tables:
                            t.execute("INSERT OR IGNORE INTO layer_updates (chain_id, updated_ns)"
                                      " SELECT chain_id, updated_ns FROM old.layer_updates")
        for suffix in ("", "-wal", "-shm"):
            try:
                os.rename(f"{old}{suffix}", f"{old}{suffix}.migrated")
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """The connection belongs to the store; nothing to release here."""

    def tx(self) -> AbstractContextManager[Tx]:
        """A write transaction on the store's database (BEGIN IMMEDIATE)."""
        return self.db.tx()

    # -- reads -------------------------------------------------------------------------
    _COLS = "id, name, kind, parent, parent_chain, chain_id, holder, created_ns, updated_ns, idmap"

    def _with_labels(self, rows: list[tuple]) -> list[Record]:
        out = []
        for row in rows:
            rec = Record(*row)
            rec.labels = dict(self.db.all("SELECT key, value FROM snapshot_labels WHERE snapshot_id=?", (rec.id,)))
            out.append(rec)
        return out

    def get(self, name: str) -> Record | None:
        rows = self.db.all(f"SELECT {self._COLS} FROM snapshots WHERE name=?", (name,))
        return self._with_labels(rows)[0] if rows else None

    def get_id(self, sid: int) -> Record | None:
        rows = self.db.all(f"SELECT {self._COLS} FROM snapshots WHERE id=?", (sid,))
        return self._with_labels(rows)[0] if rows else None

    def all(self) -> list[Record]:
        rows = self.db.all(f"SELECT {self._COLS} FROM snapshots ORDER BY id")
        labels: dict[int, dict[str, str]] = {}
        for sid, k, v in self.db.all("SELECT snapshot_id, key, value FROM snapshot_labels"):
            labels.setdefault(sid, {})[k] = v
        out = []
        for row in rows:
            rec = Record(*row)
            rec.labels = labels.get(rec.id, {})
            out.append(rec)
        return out

    def children(self, name: str) -> list[str]:
        return [r[0] for r in self.db.all("SELECT name FROM snapshots WHERE parent=? ORDER BY id", (name,))]

    def names_for_chain(self, chain_id: str) -> list[str]:
        rows = self.db.all("SELECT name FROM snapshots WHERE chain_id=? AND kind='committed' ORDER BY id",
                           (chain_id,))
        return [r[0] for r in rows]

    def committed_chain(self, name: str) -> str | None:
        row = self.db.one("SELECT chain_id FROM snapshots WHERE name=? AND kind='committed'", (name,))
        return row[0] if row else None

    def ids(self) -> set[int]:
        return {r[0] for r in self.db.all("SELECT id FROM snapshots")}

    def holders(self) -> set[str]:
        return {r[0] for r in self.db.all("SELECT holder FROM snapshots")}

    def layer_updated(self, chain_id: str) -> int | None:
        row = self.db.one("SELECT updated_ns FROM layer_updates WHERE chain_id=?", (chain_id,))
        return row[0] if row else None

    def updated_layers(self) -> list[str]:
        return [r[0] for r in self.db.all("SELECT chain_id FROM layer_updates")]

    # -- writes (call inside tx()) ------------------------------------------------------
    @staticmethod
    def insert(
        t: Tx,
        name: str,
        kind: Kind,
        parent: str,
        parent_chain: str | None,
        chain_id: str | None,
        holder: str,
        labels: dict[str, str],
        ts: int,
        sid: int | None = None,
    ) -> int:
        cur = t.execute(
            "INSERT INTO snapshots (id, name, kind, parent, parent_chain, chain_id, holder, created_ns, updated_ns)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sid, name, kind, parent, parent_chain, chain_id, holder, ts, ts),
        )
        new = int(cur.lastrowid)
        t.executemany(
            "INSERT INTO snapshot_labels (snapshot_id, key, value) VALUES (?, ?, ?)",
            [(new, k, v) for k, v in sorted(labels.items())],
        )
        return new

    @staticmethod
    def delete(t: Tx, sid: int) -> None:
        t.execute("DELETE FROM snapshots WHERE id=?", (sid,))

    @staticmethod
    def set_labels(t: Tx, sid: int, labels: dict[str, str], ts: int) -> None:
        t.execute("DELETE FROM snapshot_labels WHERE snapshot_id=?", (sid,))
        t.executemany(
            "INSERT INTO snapshot_labels (snapshot_id, key, value) VALUES (?, ?, ?)",
            [(sid, k, v) for k, v in sorted(labels.items())],
        )
        t.execute("UPDATE snapshots SET updated_ns=? WHERE id=?", (ts, sid))

    @staticmethod
    def set_idmap(t: Tx, sid: int, idmap: str) -> None:
        t.execute("UPDATE snapshots SET idmap=? WHERE id=?", (idmap, sid))

    @staticmethod
    def touch_layer(t: Tx, chain_id: str, ts: int) -> None:
        t.execute(
            "INSERT INTO layer_updates (chain_id, updated_ns) VALUES (?, ?)"
            " ON CONFLICT(chain_id) DO UPDATE SET updated_ns=excluded.updated_ns",
            (chain_id, ts),
        )

    @staticmethod
    def forget_layer(t: Tx, chain_id: str) -> None:
        t.execute("DELETE FROM layer_updates WHERE chain_id=?", (chain_id,))


def committed_chain(root: Path | str, name: str) -> str | None:
    """The chainID committed snapshot `name` of the store at root stands for (read-only; None
    when the store or the name does not exist)."""
    path = Path(root) / DB_FILE
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute("SELECT chain_id FROM snapshots WHERE name=? AND kind='committed'", (name,)).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return row[0] if row else None
