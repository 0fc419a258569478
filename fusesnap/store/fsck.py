"""fsck: the database file, leftovers of interrupted operations, rows against directories, data
against the index.

Repairs finish or undo what is half-made (pending intents, dead staging dirs,
stale locks, trash, layer directories without their index), rebuild rows of
complete layers from their own records, and remove rows whose directory is gone
when nothing depends on them. A layer whose data no longer matches its index is
reported, never silently deleted; neither is a complete, verifiable layer.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..digest import chain_id as compute_chain_id, hex_of
from ..errors import FusesnapError
from . import entriesfile
from .db import StoreDB, probe
from .exporter import export_layer
from .layout import ENTRIES, TAR_SPLIT, StoreLayout
from .recovery import FsckReport, check_leftovers, check_rowless, replay_intents


class _Null:
    def write(self, b: bytes) -> int:
        return len(b)


def missing_database(layout: StoreLayout) -> str | None:
    """Why the database is no database for this store (missing or empty beside layers), or None."""
    p = layout.db_path
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        size = -1
    if size > 0:
        return None
    n = layout.data_dirs()
    if not n:
        return None
    state = "missing" if size < 0 else "empty"
    return (f"the store database {p} is {state} but the store holds {n} layer or snapshot"
            " directories: `fusesnap fsck --repair` rebuilds it from the layers' records")


def database_problem(layout: StoreLayout) -> str | None:
    """Why the store's database cannot be trusted (missing or empty beside data, damaged), or None."""
    missing = missing_database(layout)
    if missing is not None:
        return missing
    p = layout.db_path
    if not p.exists():
        return None
    why = probe(p)
    if why is None:
        return None
    return f"the store database {p} is damaged ({why}); fsck --repair moves it aside and rebuilds it"


def set_database_aside(layout: StoreLayout) -> str:
    """Move a damaged (or empty) database out of the way so a new one can be rebuilt; returns what was done."""
    p = layout.db_path
    if not p.exists():
        return f"creating a new store database {p}"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dst = p.with_name(f"{p.name}.damaged-{stamp}")
    os.rename(p, dst)
    for suffix in ("-journal", "-wal", "-shm"):
        side = Path(f"{p}{suffix}")
        if side.exists():
            os.rename(side, Path(f"{dst}{suffix}"))
    return f"moved the store database aside to {dst.name}; rebuilding it from the layers"


def unexpected_files(layer_dir: Path) -> list[str]:
    """Paths under fs/ that no member of the layer (or an ancestor directory of one) accounts for."""
    expected: set[bytes] = set()
    for rec in entriesfile.read_records(layer_dir / ENTRIES):
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


def _check_rows(layout: StoreLayout, db: StoreDB, rep: FsckReport, repair: bool) -> None:
    for chain, diff, parent, *_ in db.layers():
        rep.checked += 1
        d = layout.layers_dir / hex_of(chain)
        if compute_chain_id(parent, diff) != chain:
            rep.problems.append(f"layer {chain}: chainID does not match parent and diffID")
        if not d.is_dir() or not (d / TAR_SPLIT).is_file() or not (d / ENTRIES).is_file():
            problem = f"layer {chain}: directory or index missing"
            if repair:
                try:
                    with layout.chain_lock(chain), db.tx() as t:
                        why = db.why_in_use(t, chain)
                        if why:
                            raise FusesnapError(why)
                        db.delete_layer(t, chain)
                    rep.repaired.append(f"removed database row of {chain} (its directory is gone)")
                    continue
                except FusesnapError:
                    problem += " (row kept: other layers or references need it)"
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


def fsck(layout: StoreLayout, db: StoreDB, repair: bool) -> FsckReport:
    """Check (and with repair, mend) one store; the database file itself must already be usable."""
    rep = FsckReport()
    for why in db.quick_check():
        rep.problems.append(f"the store database {db.path}: {why}")
    replay_intents(layout, db, rep, repair)
    check_leftovers(layout, rep, repair)
    check_rowless(layout, db, rep, repair)
    _check_rows(layout, db, rep, repair)
    return rep
