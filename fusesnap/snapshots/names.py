"""Committed snapshot names -> chainIDs, for commands outside the snapshotter (e.g. `fusesnap export NAME`).

Reads snapshots.db only (read-only, never creates it), so the layer store's
CLI can accept every committed name, also when one layer carries several.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .snapshotter import DB_NAME


def chain_of_name(root: Path | str, name: str) -> str | None:
    """The chainID committed snapshot `name` stands for, or None."""
    db = Path(root) / DB_NAME
    if not db.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return None
    try:
        row = conn.execute(
            "SELECT chain_id FROM snapshots WHERE name=? AND kind='committed'", (name,)
        ).fetchone()
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return row[0] if row else None
