"""Crashes and races across the snapshotter and the store, done for real: `kill -9` of the CLI at
every step of commit, prepare and remove (and at random moments), two commits racing for one
name, gc in a tight loop beside commits.

After each: no reference without its snapshot, no layer sharing an inode with an upper, the
upper of a commit that did not happen exactly as it was, and `fsck` clean.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from helpers import script

from fusesnap.errors import InUse, NotFound
from fusesnap.snapshots.snapshotter import Snapshotter


def fusesnap(root: Path, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([script("fusesnap"), "--root", str(root), *args], capture_output=True, env=env,
                          **kw)


def crash_env(point: str) -> dict:
    return dict(os.environ, FUSESNAP_CRASH_AT=point)


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_600_000_000
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def make_store(root: Path) -> str:
    """A base layer (pinned only by the snapshots built on it) and an active snapshot 'k' with changes."""
    with Snapshotter(root) as sn:
        base = sn.store.import_tar(io.BytesIO(layer_tar({"base/f": b"base" * 100}))).chain_id
        sn.prepare("k", base)
        up = sn.upper_dir("k")
        (up / "a").mkdir()
        (up / "a" / "big").write_bytes(os.urandom(300_000))
        (up / "a" / "small").write_bytes(b"small")
        os.chmod(up / "a" / "small", 0o600)
        os.link(up / "a" / "big", up / "a" / "big-link")
    return base


def diff_of(root: Path, key: str) -> bytes:
    with Snapshotter(root, finish=False) as sn:
        out = io.BytesIO()
        sn.diff(key, out)
        return out.getvalue()


def inodes(dirs: list[Path]) -> set[tuple[int, int]]:
    out = set()
    for d in dirs:
        for dirpath, _dirs, files in os.walk(d):
            for n in files:
                st = os.lstat(os.path.join(dirpath, n))
                out.add((st.st_dev, st.st_ino))
    return out


def check_invariants(root: Path) -> None:
    """What must hold right after a crash, before anything is repaired: no layer shares an inode
    with a snapshot's upper (an upper a killed commit detached from its record may linger until
    the next command opens the store: nothing can mount or write it); every snapshot reference
    is held by a snapshot."""
    with Snapshotter(root, finish=False) as sn:
        layers = [sn.store.fs_dir(li.chain_id) for li in sn.store.list()]
        writable = [sn.snapshot_dir(r.id) for r in sn.db.all() if r.kind == "active"]
        assert not inodes(layers) & inodes(writable), "a layer shares an inode with a snapshot directory"
        holders = {r.holder for r in sn.db.all()}
        for chain, holder, _kind in sn.store.holders("snapshot:"):
            assert holder in holders, f"reference {holder} on {chain} has no snapshot"


def repaired_clean(root: Path) -> None:
    r = fusesnap(root, "fsck", "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    r = fusesnap(root, "--json", "fsck")
    rep = json.loads(r.stdout)
    assert r.returncode == 0 and rep["ok"] and rep["repaired"] == [], rep


def everything_removable(root: Path, base: str) -> None:
    """No leaked reference: removing every snapshot (children first) lets every layer go too."""
    with Snapshotter(root) as sn:
        for _ in range(10):
            infos = sn.list()
            if not infos:
                break
            for info in infos:
                try:
                    sn.remove(info.name)
                except (InUse, NotFound):
                    pass
        assert sn.list() == [] and sn.store.list() == [], "a reference outlived its snapshot"
        assert [p for p in (root / "snapshots").iterdir() if p.name != ".trash"] == []


COMMIT_POINTS = ["staged", "before-rename", "after-rename", "commit-after-tx", "in-trash"]


@pytest.mark.parametrize("point", COMMIT_POINTS)
def test_commit_killed_at_each_step(tmp_path, point):
    root = tmp_path / "root"
    base = make_store(root)
    before = diff_of(root, "k")
    r = fusesnap(root, "commit", "c", "k", env=crash_env(point))
    assert r.returncode == -9, r.stderr
    check_invariants(root)
    with Snapshotter(root) as sn:  # opening it finishes what the commit's transaction decided
        assert [p.name for p in (root / "snapshots").glob("[0-9]*")] == \
            [str(r.id) for r in sn.db.all() if r.kind == "active"]
        committed = sn.db.get("c") is not None
        assert committed == (point in ("commit-after-tx", "in-trash"))
        if committed:
            assert sn.db.get("k") is None
            out = io.BytesIO()
            sn.store.export("c", out)
            assert out.getvalue() == before
        else:
            assert sn.stat("k").kind == "active"
    check_invariants(root)
    if not committed:
        assert diff_of(root, "k") == before  # the upper exactly as it was
        r = fusesnap(root, "commit", "c", "k")
        assert r.returncode == 0, r.stderr
    repaired_clean(root)
    everything_removable(root, base)


@pytest.mark.parametrize("point", ["prepare-before-commit", "remove-after-tx", "in-trash"])
def test_prepare_and_remove_killed(tmp_path, point):
    root = tmp_path / "root"
    base = make_store(root)
    if point == "prepare-before-commit":
        r = fusesnap(root, "prepare", "p", base, env=crash_env(point))
    else:
        r = fusesnap(root, "remove", "k", env=crash_env(point))
    assert r.returncode == -9
    check_invariants(root)
    with Snapshotter(root) as sn:
        assert sn.db.get("p") is None
        assert (sn.db.get("k") is None) == (point != "prepare-before-commit")
    repaired_clean(root)
    everything_removable(root, base)


def test_commits_killed_at_random_moments(tmp_path):
    seed = int(os.environ.get("FUSESNAP_TEST_SEED", time.time()))
    rnd = random.Random(seed)
    root = tmp_path / "root"
    base = make_store(root)
    t0 = time.monotonic()
    probe = tmp_path / "probe"
    make_store(probe)
    assert fusesnap(probe, "commit", "c", "k").returncode == 0
    duration = time.monotonic() - t0
    for i in range(6):
        with Snapshotter(root) as sn:
            if sn.db.get("k") is None:
                sn.prepare("k", base)
                (sn.upper_dir("k") / f"f{i}").write_bytes(os.urandom(rnd.choice((10, 100_000))))
        before = diff_of(root, "k")
        p = subprocess.Popen([script("fusesnap"), "--root", str(root), "commit", f"c{i}", "k"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(0, duration))
        p.kill()
        p.wait()
        check_invariants(root)
        with Snapshotter(root) as sn:
            if sn.db.get(f"c{i}") is None:
                assert diff_of(root, "k") == before, f"seed {seed}"
            else:
                out = io.BytesIO()
                sn.store.export(f"c{i}", out)
                assert out.getvalue() == before, f"seed {seed}"
    repaired_clean(root)
    everything_removable(root, base)


def test_two_commits_racing_for_one_name(tmp_path):
    """The loser fails cleanly: its upper untouched, no layer holding its files."""
    root = tmp_path / "root"
    for r in range(3):
        keys = (f"ka{r}", f"kb{r}")
        with Snapshotter(root) as sn:
            for key in keys:
                sn.prepare(key)
                (sn.upper_dir(key) / "payload.bin").write_bytes(os.urandom(200_000) + key.encode())
        befores = {k: diff_of(root, k) for k in keys}
        procs = {k: subprocess.Popen([script("fusesnap"), "--root", str(root), "commit", f"same{r}", k],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in keys}
        results = {k: (p.wait(), p.stderr.read()) for k, p in procs.items()}
        winners = [k for k, (rc, _) in results.items() if rc == 0]
        assert len(winners) == 1, results
        loser = keys[1] if winners == [keys[0]] else keys[0]
        rc, err = results[loser]
        assert rc == 1 and err.count(b"\n") == 1 and b"already" in err, err
        check_invariants(root)
        assert diff_of(root, loser) == befores[loser]
        with Snapshotter(root) as sn:
            # writing through the loser's upper (as a later mount does) must corrupt no layer
            with open(sn.upper_dir(loser) / "payload.bin", "r+b") as f:
                f.write(b"X" * 100)
    repaired_clean(root)


def test_gc_in_a_loop_beside_commits(tmp_path):
    root = tmp_path / "root"
    with Snapshotter(root) as sn:
        base = sn.store.import_tar(io.BytesIO(layer_tar({"b": b"b"})), labels={"fusesnap.io/gc.root": "true"}).chain_id
    stop = threading.Event()
    gc_errors: list[bytes] = []

    def gc_loop() -> None:
        while not stop.is_set():
            r = fusesnap(root, "gc")
            if r.returncode != 0:
                gc_errors.append(r.stderr)

    failures = []
    t = threading.Thread(target=gc_loop)
    t.start()
    try:
        for i in range(25):
            for args in (("prepare", f"k{i}", base), ("commit", f"c{i}", f"k{i}")):
                r = fusesnap(root, *args)
                if r.returncode != 0:
                    failures.append((args, r.stderr))
                if args[0] == "prepare" and r.returncode == 0:
                    with Snapshotter(root) as sn:
                        (sn.upper_dir(f"k{i}") / "f").write_bytes(f"{i}".encode())
    finally:
        stop.set()
        t.join()
    assert failures == [] and gc_errors == []
    with Snapshotter(root) as sn:
        assert sorted(sn.db.names_for_chain(sn.stat("c3").chain_id)) == ["c3"]
        assert len(sn.list("kind==committed")) >= 25
    repaired_clean(root)


def test_fsck_reports_and_repair_drops_references_no_snapshot_holds(tmp_path):
    """A reference a crashed older version left behind (add_ref before the snapshot row)."""
    root = tmp_path / "root"
    base = make_store(root)
    with Snapshotter(root) as sn:
        sn.store.add_ref(base, "snapshot:abd64a0c")
    r = fusesnap(root, "fsck")
    assert r.returncode == 1 and b"snapshot:abd64a0c, which no snapshot holds" in r.stdout, r.stdout
    rm = fusesnap(root, "rm", base)
    assert rm.returncode == 1 and b"referenced" in rm.stderr
    assert fusesnap(root, "cleanup").returncode == 0
    repaired_clean(root)
    everything_removable(root, base)
