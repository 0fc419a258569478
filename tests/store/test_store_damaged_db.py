"""A truncated, missing or scribbled-over database is damage to report, never an empty store:
every command fails with one line naming the file, nothing is deleted, and `fsck --repair`
rebuilds the database from the layers' own records (and the snapshots' records), after
which every layer exports byte for byte again."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from storeutil import fusesnap, tar_of

COMMANDS = [["layers"], ["export", "base"], ["inspect", "base"], ["list"], ["prepare", "x"], ["gc"],
            ["rm", "base"], ["remove", "k"], ["fsck"], ["stat", "k"], ["cleanup"]]



def build(root: Path) -> dict[str, bytes]:
    """Two imported layers (one named), a commit on top, an active snapshot on the commit."""
    base, top = tar_of({"a": b"1" * 5000}), tar_of({"b": b"2" * 700})
    assert fusesnap(root, "import", "--name", "base", "-", input=base).returncode == 0
    r = fusesnap(root, "import", "--parent", "base", "-", input=top)
    assert r.returncode == 0, r.stderr
    chain = r.stdout.split()[0].decode()
    assert fusesnap(root, "prepare", "work", chain).returncode == 0
    upper = next((root / "snapshots").glob("[0-9]*")) / "upper"
    (upper / "c").write_bytes(b"3" * 900)
    assert fusesnap(root, "commit", "mine", "work").returncode == 0
    assert fusesnap(root, "prepare", "k", "mine").returncode == 0
    return {"base": base, chain: top, "mine": fusesnap(root, "export", "mine").stdout}


def layer_dirs(root: Path) -> list[str]:
    return sorted(os.listdir(root / "layers"))


def assert_one_line_errors(root: Path, must: str) -> None:
    for cmd in COMMANDS:
        r = fusesnap(root, *cmd)
        err = r.stderr.decode()
        assert r.returncode == 1, (cmd, r.stdout, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (cmd, err)
        said = r.stdout.decode() + err if cmd == ["fsck"] else err  # fsck lists its problems on stdout
        assert str(root / "metadata.db") in said and must in said, (cmd, said)


def assert_rebuilt(root: Path, tars: dict[str, bytes]) -> None:
    r = fusesnap(root, "fsck", "--repair")
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "rebuilt the database row" in out and "restored active snapshot 'k'" in out, out
    r = fusesnap(root, "--json", "fsck")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stdout
    for ref, data in tars.items():
        assert fusesnap(root, "export", ref).stdout == data, ref
    infos = {i["name"]: i for i in json.loads(fusesnap(root, "--json", "list").stdout)}
    assert infos["k"]["kind"] == "active" and infos["k"]["parent"] == "mine"
    assert infos["mine"]["kind"] == "committed"
    # the restored records hold their references again: the base cannot go while they exist
    assert fusesnap(root, "rm", "base").returncode == 1
    assert fusesnap(root, "remove", "k", "mine").returncode == 0


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "root"
    tars = build(root)
    return root, tars, layer_dirs(root), root / "metadata.db"


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_empty_or_missing_database_beside_layers_is_damage(store, damage):
    root, tars, before, db = store
    if damage == "truncated":
        os.truncate(db, 0)
    else:
        db.unlink()
    assert_one_line_errors(root, "missing" if damage == "missing" else "empty")
    assert layer_dirs(root) == before  # gc, rm, fsck: nothing deleted
    assert_rebuilt(root, tars)


@pytest.mark.parametrize("where", ["header", "pages"])
def test_random_bytes_in_the_database(store, where):
    root, tars, before, db = store
    rnd = random.Random(5)
    with open(db, "r+b") as f:
        if where == "header":
            f.write(rnd.randbytes(100))
        else:  # every page but the first (the schema stays readable, the tables do not)
            f.seek(4096)
            f.write(rnd.randbytes(db.stat().st_size - 4096))
    assert_one_line_errors(root, "damaged")
    assert layer_dirs(root) == before
    r = fusesnap(root, "fsck")
    assert "problem: the store database" in r.stdout.decode()
    assert_rebuilt(root, tars)
    assert [p.name for p in root.glob("metadata.db.damaged-*")]  # kept for inspection, not deleted


def test_rows_lost_from_an_intact_database_are_rebuilt_not_deleted(tmp_path):
    """gc and fsck --repair never delete a complete, verifiable layer whose row is gone."""
    import sqlite3

    root = tmp_path / "root"
    data = tar_of({"x": b"x" * 3000})
    chain = fusesnap(root, "import", "-", input=data).stdout.split()[0].decode()
    c = sqlite3.connect(root / "metadata.db")
    c.execute("PRAGMA foreign_keys=OFF")
    with c:
        c.execute("DELETE FROM layer_labels")
        c.execute("DELETE FROM layers")
    c.close()
    assert fusesnap(root, "gc").returncode == 0
    assert layer_dirs(root) == [chain[7:]]
    r = fusesnap(root, "fsck")
    assert r.returncode == 1 and b"has no database row" in r.stdout
    assert fusesnap(root, "fsck", "--repair").returncode == 0
    assert fusesnap(root, "export", chain).stdout == data
    info = json.loads(fusesnap(root, "--json", "inspect", chain).stdout)
    assert info["labels"] == {"fusesnap.io/gc.root": "true"}  # from the layer's own record


def test_a_layer_whose_directory_went_missing(tmp_path):
    """prepare and view refuse a parent whose layer directory is gone; fsck names it."""
    import shutil

    root = tmp_path / "root"
    chain = fusesnap(root, "import", "-", input=tar_of({"x": b"x"})).stdout.split()[0].decode()
    shutil.rmtree(root / "layers" / chain[7:])
    for cmd in ("prepare", "view"):
        r = fusesnap(root, cmd, "k", chain)
        assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"directory or index is missing" in r.stderr
    assert fusesnap(root, "list", "--json").stdout.strip() != b""
    r = fusesnap(root, "fsck")
    assert r.returncode == 1 and f"layer {chain}: directory or index missing".encode() in r.stdout
