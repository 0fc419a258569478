"""fsck: leftovers of interrupted imports/removals, DB rows vs. directories, data vs. index.

Repairs only remove what is half-made (unlocked staging dirs, trash, layer dirs without
a DB row) and rows whose directory is gone when nothing depends on them; a layer whose
data no longer matches its index is reported, never silently deleted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..digest import chain_id as compute_chain_id, hex_of
from ..errors import FusesnapError
from . import db as dbm
from . import entriesfile
from .exporter import export_layer
from .locks import FileLock, is_locked

if TYPE_CHECKING:
    from .layerstore import FsckReport, LayerStore


class _Null:
    def write(self, b: bytes) -> int:
        return len(b)


def check_leftovers(store: "LayerStore", rep: "FsckReport", repair: bool) -> None:
    from .layerstore import rmtree

    for p in sorted(store.staging_dir.iterdir()):
        if p.name.endswith(".lock"):
            if not (store.staging_dir / p.name[:-5]).exists() and not is_locked(p):
                if repair:
                    p.unlink(missing_ok=True)
            continue
        lock = store.staging_dir / f"{p.name}.lock"
        if is_locked(lock):
            continue  # a live import
        if repair:
            rmtree(p)
            lock.unlink(missing_ok=True)
            rep.repaired.append(f"removed staging leftover staging/{p.name}")
        else:
            rep.problems.append(f"staging leftover staging/{p.name}")
    for p in sorted(store.trash_dir.iterdir()):
        if repair:
            rmtree(p)
            rep.repaired.append(f"removed trash leftover trash/{p.name}")
        else:
            rep.problems.append(f"trash leftover trash/{p.name}")
    for p in sorted(store.layers_dir.iterdir()):
        chain = "sha256:" + p.name
        if store.exists(chain):
            continue
        try:
            lock = FileLock(store.locks_dir / f"{p.name}.lock", blocking=False)
        except BlockingIOError:
            continue  # an import is between rename and commit
        try:
            if store.exists(chain):
                continue
            if repair:
                store._trash(p)
                rep.repaired.append(f"removed layer directory without a database row layers/{p.name}")
            else:
                rep.problems.append(f"layer directory layers/{p.name} has no database row")
        finally:
            lock.close()


def unexpected_files(layer_dir: Path) -> list[str]:
    """Paths under fs/ that no member of the layer (or an ancestor directory of one) accounts for."""
    expected: set[bytes] = set()
    for rec in entriesfile.read_records(layer_dir / "entries.json.zst"):
        p = entriesfile.b(rec[entriesfile.P])
        while p and p not in expected:
            expected.add(p)
            p = p.rpartition(b"/")[0]
    fs = os.fsencode(layer_dir / "fs")
    out = []
    for dirpath, dirnames, filenames in os.walk(fs):
        rel = os.path.relpath(dirpath, fs)
        for n in dirnames + filenames:
            p = n if rel == b"." else rel + b"/" + n
            if p not in expected:
                out.append(os.fsdecode(p))
        dirnames[:] = [n for n in dirnames if (n if rel == b"." else rel + b"/" + n) in expected]
    return sorted(out)


def fsck(store: "LayerStore", repair: bool) -> "FsckReport":
    from .layerstore import ENTRIES, TAR_SPLIT, FsckReport

    rep = FsckReport()
    check_leftovers(store, rep, repair)
    with store._lock:
        rows = store.conn.execute("SELECT chain_id, diff_id, parent FROM layers ORDER BY chain_id").fetchall()
    for chain, diff, parent in rows:
        rep.checked += 1
        d = store.layers_dir / hex_of(chain)
        if compute_chain_id(parent, diff) != chain:
            rep.problems.append(f"layer {chain}: chainID does not match parent and diffID")
        if not d.is_dir() or not (d / TAR_SPLIT).is_file() or not (d / ENTRIES).is_file():
            problem = f"layer {chain}: directory or index missing"
            if repair:
                try:
                    with store._lock, dbm.Tx(store.conn) as c:
                        if c.execute("SELECT 1 FROM layers WHERE parent=?", (chain,)).fetchone() or \
                                c.execute("SELECT 1 FROM layer_refs WHERE chain_id=?", (chain,)).fetchone():
                            raise FusesnapError("still referenced")
                        c.execute("DELETE FROM layer_labels WHERE chain_id=?", (chain,))
                        c.execute("DELETE FROM layers WHERE chain_id=?", (chain,))
                    rep.repaired.append(f"removed database row of {chain} (its directory is gone)")
                    continue
                except FusesnapError:
                    problem += " (not removed: other layers or references need it)"
            rep.problems.append(problem)
            continue
        try:
            export_layer(d, diff, _Null(), chain)  # type: ignore[arg-type]
            extra = unexpected_files(d)
            if extra:
                more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
                rep.problems.append(f"layer {chain}: unexpected file fs/{extra[0]}{more}: layers are immutable")
        except (FusesnapError, OSError) as e:
            rep.problems.append(str(e))
    return rep
