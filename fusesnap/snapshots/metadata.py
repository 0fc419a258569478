"""Snapshot records in SQLite (snapshots.db in the store root), kept apart from the store's own tables.

Only explicit snapshots live here: active ones, views, and committed names
given by `commit`. Store layers that nobody named are committed snapshots too
(named by their chainID); the snapshotter merges both views. Timestamps are
integer nanoseconds so created == updated holds exactly until an update.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Literal

Kind = Literal["active", "view", "committed"]
KINDS: tuple[Kind, ...] = ("active", "view", "committed")

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
    updated_ns   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
CREATE INDEX IF NOT EXISTS snapshots_chain ON snapshots(chain_id);
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
    labels: dict[str, str] = field(default_factory=dict)


class SnapshotDB:
    """Thin data-access layer; every method is one short transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            str(path), timeout=60, isolation_level=None, check_same_thread=False
        )
        c = self._conn
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.execute("PRAGMA foreign_keys=ON")
        c.executescript(_SCHEMA)
        cols = {r[1] for r in c.execute("PRAGMA table_info(snapshots)")}
        if "holder" not in cols:  # databases written before holders were per record
            c.execute("ALTER TABLE snapshots ADD COLUMN holder TEXT NOT NULL DEFAULT ''")
            c.execute("UPDATE snapshots SET holder = 'snapshot:' || name")

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("snapshot database is closed")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE: concurrent CLI processes serialize here)."""
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        else:
            c.execute("COMMIT")

    # -- reads -------------------------------------------------------------------------
    def _labels(self, sid: int) -> dict[str, str]:
        rows = self.conn.execute("SELECT key, value FROM snapshot_labels WHERE snapshot_id=?", (sid,))
        return {k: v for k, v in rows}

    def _record(self, row: tuple) -> Record:
        rec = Record(*row)
        rec.labels = self._labels(rec.id)
        return rec

    _COLS = "id, name, kind, parent, parent_chain, chain_id, holder, created_ns, updated_ns"

    def get(self, name: str) -> Record | None:
        row = self.conn.execute(f"SELECT {self._COLS} FROM snapshots WHERE name=?", (name,)).fetchone()
        return self._record(row) if row else None

    def all(self) -> list[Record]:
        rows = self.conn.execute(f"SELECT {self._COLS} FROM snapshots ORDER BY id").fetchall()
        labels: dict[int, dict[str, str]] = {}
        for sid, k, v in self.conn.execute("SELECT snapshot_id, key, value FROM snapshot_labels"):
            labels.setdefault(sid, {})[k] = v
        out = []
        for row in rows:
            rec = Record(*row)
            rec.labels = labels.get(rec.id, {})
            out.append(rec)
        return out

    def children(self, name: str) -> list[str]:
        rows = self.conn.execute("SELECT name FROM snapshots WHERE parent=? ORDER BY id", (name,))
        return [r[0] for r in rows]

    def names_for_chain(self, chain_id: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT name FROM snapshots WHERE chain_id=? AND kind='committed' ORDER BY id", (chain_id,)
        )
        return [r[0] for r in rows]

    def ids(self) -> set[int]:
        return {r[0] for r in self.conn.execute("SELECT id FROM snapshots")}

    def layer_updated(self, chain_id: str) -> int | None:
        row = self.conn.execute("SELECT updated_ns FROM layer_updates WHERE chain_id=?", (chain_id,)).fetchone()
        return row[0] if row else None

    # -- writes (call inside tx()) ------------------------------------------------------
    @staticmethod
    def insert(
        c: sqlite3.Connection,
        name: str,
        kind: Kind,
        parent: str,
        parent_chain: str | None,
        chain_id: str | None,
        holder: str,
        labels: dict[str, str],
        ts: int,
    ) -> int:
        cur = c.execute(
            "INSERT INTO snapshots (name, kind, parent, parent_chain, chain_id, holder, created_ns, updated_ns)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (name, kind, parent, parent_chain, chain_id, holder, ts, ts),
        )
        sid = int(cur.lastrowid)
        c.executemany(
            "INSERT INTO snapshot_labels (snapshot_id, key, value) VALUES (?, ?, ?)",
            [(sid, k, v) for k, v in sorted(labels.items())],
        )
        return sid

    @staticmethod
    def delete(c: sqlite3.Connection, sid: int) -> None:
        c.execute("DELETE FROM snapshots WHERE id=?", (sid,))

    @staticmethod
    def set_labels(c: sqlite3.Connection, sid: int, labels: dict[str, str], ts: int) -> None:
        c.execute("DELETE FROM snapshot_labels WHERE snapshot_id=?", (sid,))
        c.executemany(
            "INSERT INTO snapshot_labels (snapshot_id, key, value) VALUES (?, ?, ?)",
            [(sid, k, v) for k, v in sorted(labels.items())],
        )
        c.execute("UPDATE snapshots SET updated_ns=? WHERE id=?", (ts, sid))

    @staticmethod
    def touch_layer(c: sqlite3.Connection, chain_id: str, ts: int) -> None:
        c.execute(
            "INSERT INTO layer_updates (chain_id, updated_ns) VALUES (?, ?)"
            " ON CONFLICT(chain_id) DO UPDATE SET updated_ns=excluded.updated_ns",
            (chain_id, ts),
        )

    @staticmethod
    def forget_layer(c: sqlite3.Connection, chain_id: str) -> None:
        c.execute("DELETE FROM layer_updates WHERE chain_id=?", (chain_id,))
