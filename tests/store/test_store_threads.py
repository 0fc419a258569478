"""Threads of one process (`fusesnap serve` gives each gRPC thread its own store connections)
must not undo each other's database locks: opening the store in one thread while another
holds a write transaction keeps that transaction's lock, as other processes see it."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading

from fusesnap.store.layerstore import LayerStore

# another process's attempt at a write transaction, failing at once if the database is locked
PROBE = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], timeout=0.2, isolation_level=None)
try:
    c.execute("BEGIN IMMEDIATE")
except sqlite3.OperationalError as e:
    print(e)
    sys.exit(0)
c.execute("ROLLBACK")
print("got the write lock")
sys.exit(1)
"""


def test_opening_the_store_keeps_other_threads_locks(tmp_path):
    root = tmp_path / "store"
    LayerStore(root).close()
    holding, release = threading.Event(), threading.Event()

    def writer() -> None:
        with LayerStore(root) as store, store.db.tx():
            holding.set()
            release.wait(30)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert holding.wait(30)
        db = root / "metadata.db"
        before = subprocess.run([sys.executable, "-c", PROBE, str(db)], capture_output=True, text=True)
        assert before.returncode == 0, before.stdout       # the writer's lock holds
        for _ in range(3):
            LayerStore(root).close()                       # another thread opens the store
        after = subprocess.run([sys.executable, "-c", PROBE, str(db)], capture_output=True, text=True)
        assert after.returncode == 0, "opening the store dropped another thread's lock: " + after.stdout
        assert "locked" in after.stdout
    finally:
        release.set()
        t.join(30)
    with sqlite3.connect(root / "metadata.db") as c:
        assert c.execute("PRAGMA quick_check").fetchone() == ("ok",)
