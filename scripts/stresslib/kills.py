"""Seeded SIGKILLs of import, commit, remove and gc, at random moments inside each operation,
each followed by the crash invariants, fsck --repair, a clean fsck and the model's bytes."""

from __future__ import annotations

import random
import time
from pathlib import Path

from fusesnap.snapshots.snapshotter import Snapshotter

from .common import Cli, Model, StressFailure, diff_digest, invariants, random_tar, repaired_and_clean, sha, \
    write_upper


def _calibrate(cli: Cli, *args: str, input_path: Path | None = None) -> float:
    t0 = time.monotonic()
    r = cli.run(*args, input=input_path.read_bytes() if input_path else None)
    if r.returncode != 0:
        raise StressFailure(f"calibration `{' '.join(args)}` failed: {r.stderr.decode()}")
    return max(time.monotonic() - t0, 0.05)


def _after(cli: Cli, model: Model, where: str) -> None:
    invariants(cli.root, where)
    repaired_and_clean(cli, where)
    model.verify(cli.root, where)


def kill_imports(cli: Cli, rnd: random.Random, n: int, model: Model, work: Path) -> tuple[int, int]:
    """n imports, each SIGKILLed at a random moment; returns (kills, how many hit a live process)."""
    tarp = work / "import.tar"
    tarp.write_bytes(random_tar(rnd, 300, big=True))
    within = _calibrate(Cli(cli.bin_dir, work / "calibrate-import"), "import", "-", input_path=tarp) * 0.9
    landed = 0
    for i in range(n):
        data = random_tar(rnd, rnd.choice((50, 300)), big=True)
        tarp.write_bytes(data)
        rc, err = cli.killed(rnd, within, "import", "-", input_path=tarp)
        if rc == 0:
            model.layers[sha(data)] = sha(data)
        elif rc != -9:
            raise StressFailure(f"import {i}: rc {rc}: {err.decode()}")
        landed += rc == -9
        _after(cli, model, f"import kill {i}")
    return n, landed


def _new_active(sn: Snapshotter, rnd: random.Random, key: str, model: Model) -> None:
    parents = [""] + sorted(model.layers)
    sn.prepare(key, rnd.choice(parents))
    write_upper(rnd, sn.upper_dir(key), rnd.choice((3, 30)))


def kill_commits(cli: Cli, rnd: random.Random, n: int, model: Model, work: Path) -> tuple[int, int]:
    cal = Cli(cli.bin_dir, work / "calibrate-commit")
    with Snapshotter(cal.root) as sn:
        _new_active(sn, rnd, "k", Model())
    within = _calibrate(cal, "commit", "c", "k") * 0.9
    landed = 0
    for i in range(n):
        key, name = f"k{i}", f"c{i}"
        with Snapshotter(cli.root) as sn:
            _new_active(sn, rnd, key, model)
        expected = diff_digest(cli.root, key)
        rc, err = cli.killed(rnd, within, "commit", name, key)
        if rc not in (0, -9):
            raise StressFailure(f"commit {i}: rc {rc}: {err.decode()}")
        landed += rc == -9
        invariants(cli.root, f"commit kill {i}")
        with Snapshotter(cli.root) as sn:
            committed = sn.db.get(name) is not None
        if rc == 0 and not committed:
            raise StressFailure(f"commit {i} returned 0 but {name!r} does not exist")
        if committed:
            model.commits[name] = expected
        else:
            model.actives[key] = expected
        _after(cli, model, f"commit kill {i}")
    return n, landed


def kill_removes(cli: Cli, rnd: random.Random, n: int, model: Model, work: Path) -> tuple[int, int]:
    cal = Cli(cli.bin_dir, work / "calibrate-remove")
    with Snapshotter(cal.root) as sn:
        _new_active(sn, rnd, "k", Model())
    within = _calibrate(cal, "remove", "k") * 0.9
    done = landed = 0
    while done < n:
        i = done
        candidates = [("active", k) for k in model.actives] + [("commit", c) for c in model.commits]
        if len(candidates) < 2:
            key = f"r{i}-{rnd.getrandbits(16)}"
            with Snapshotter(cli.root) as sn:
                _new_active(sn, rnd, key, model)
            model.actives[key] = diff_digest(cli.root, key)
            continue
        kind, key = rnd.choice(sorted(candidates))
        rc, err = cli.killed(rnd, within, "remove", key)
        if rc not in (0, -9):
            raise StressFailure(f"remove {i}: rc {rc}: {err.decode()}")
        landed += rc == -9
        with Snapshotter(cli.root) as sn:
            gone = sn.db.get(key) is None
        if rc == 0 and not gone:
            raise StressFailure(f"remove {key!r} returned 0 but it still exists")
        if gone:
            (model.actives if kind == "active" else model.commits).pop(key)
        _after(cli, model, f"remove kill {i}")
        done += 1
    return done, landed


def kill_gcs(cli: Cli, rnd: random.Random, n: int, model: Model, work: Path) -> tuple[int, int]:
    tarp = work / "gc.tar"
    cal = Cli(cli.bin_dir, work / "calibrate-gc")
    for _ in range(2):
        cal.ok("import", "--label", "fusesnap.io/gc.root=", "-", input=random_tar(rnd, 40))
    within = _calibrate(cal, "gc") * 0.9
    landed = 0
    for i in range(n):
        for _ in range(rnd.choice((1, 3))):  # layers nothing needs: gc takes them
            tarp.write_bytes(random_tar(rnd, 40))
            cli.ok("import", "--label", "fusesnap.io/gc.root=", "-", input=tarp.read_bytes())
        rc, err = cli.killed(rnd, within, "gc")
        if rc not in (0, -9):
            raise StressFailure(f"gc {i}: rc {rc}: {err.decode()}")
        landed += rc == -9
        _after(cli, model, f"gc kill {i}")
    return n, landed
