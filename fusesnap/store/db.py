"""SQLite (WAL) metadata of the layer store: layers, compressed digests, references, labels.

Short transactions only; `busy_timeout` lets concurrent CLI processes queue up.
The snapshotter may add its own tables to the same file.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..errors import FusesnapError

SCHEMA = """
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
CREATE TABLE IF NOT EXISTS layer_labels (
    chain_id TEXT NOT NULL REFERENCES layers(chain_id),
    key      TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (chain_id, key)
);
CREATE INDEX IF NOT EXISTS labels_by_value ON layer_labels(key, value);
"""


def connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, timeout=60.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
    except sqlite3.Error as e:
        raise FusesnapError(f"cannot open the store database {path}: {e}") from None
    return conn


class Tx:
    """`with Tx(conn):` an IMMEDIATE transaction, committed on success, rolled back on error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
