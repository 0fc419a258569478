"""kill -9 of `fusesnap serve` in the middle of Prepare and Commit, then a restart.

The daemon is killed while calls run (a storm of Prepares; a Commit of an
upper with thousands of files), restarted on the same store, and then: every
snapshot is either there whole or not at all, the interrupted work can be
redone, `fusesnap fsck` is clean, and no mount of the store is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from containerd_env import FusesnapServe, fuse_daemons, store_mounts
from helpers import wait_for
from fusesnap.daemon.client import RemoteSnapshotter
from fusesnap.errors import FusesnapError, NotFound
from fusesnap.daemon.client import perform
from fusesnap.snapshots.mounting import umount
from helpers import script

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


@pytest.fixture
def serve():
    base = Path(tempfile.mkdtemp(prefix="fusesnap-crash-", dir="/var/tmp"))
    s = FusesnapServe(base / "store", base / "fusesnap.sock", base / "fusesnap.log")
    s.start()
    yield s
    if s.proc is not None:
        s.stop(signal.SIGKILL)
    for mp in store_mounts(s.root):
        umount(mp)
    shutil.rmtree(base, ignore_errors=True)


def fsck_clean(root: Path) -> None:
    r = subprocess.run([script("fusesnap"), "--root", str(root), "--json", "fsck"], capture_output=True, text=True)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"] and report["problems"] == [], r.stdout + r.stderr


def restart(serve: FusesnapServe) -> RemoteSnapshotter:
    serve.start()
    c = RemoteSnapshotter(serve.address)
    c.wait_ready(30)
    return c


def test_kill_during_prepares(serve):
    c = RemoteSnapshotter(serve.address)
    c.wait_ready(30)
    c.prepare("base-work")
    c.commit("base", "base-work")
    done: list[str] = []
    failed: list[BaseException] = []

    def storm() -> None:
        for i in range(400):
            try:
                c.prepare(f"p{i}", "base")
                done.append(f"p{i}")
            except FusesnapError as e:
                failed.append(e)
                return

    t = threading.Thread(target=storm)
    t.start()
    while len(done) < 20 and t.is_alive():
        time.sleep(0.005)
    serve.stop(signal.SIGKILL)
    t.join(60)
    c.close()
    assert failed and 20 <= len(done) < 400      # it really died mid-storm
    c = restart(serve)
    active = {i.name for i in c.list("kind==active")}
    assert set(done) <= active                     # every acknowledged Prepare survived
    for key in active - set(done):                 # at most the one in flight, and whole
        assert "rw" in c.mounts(key)[0].options
    c.prepare(f"p{len(done)}-again", "base")       # the store takes new work
    for key in active:
        c.remove(key)
    c.remove("p" + f"{len(done)}-again")
    c.cleanup()
    fsck_clean(serve.root)
    c.close()


def test_kill_during_commit(serve, shared_tmp):
    c = RemoteSnapshotter(serve.address)
    c.wait_ready(30)
    mounts = c.prepare("big")
    mp = shared_tmp / "mnt"
    mp.mkdir()
    perform(mounts, mp)                   # what containerd does with the returned mounts
    try:
        for d in range(40):
            (mp / f"d{d}").mkdir()
            for f in range(100):
                (mp / f"d{d}" / f"f{f}").write_bytes(b"x" * 3000)
    finally:
        umount(mp)
    commit = threading.Thread(target=lambda: _ignore(c.commit, "big-committed", "big"))
    commit.start()
    staging = serve.root / "staging"
    deadline = time.monotonic() + 60
    while not any(not p.name.endswith(".lock") for p in staging.iterdir()):   # the import is under way
        assert time.monotonic() < deadline and commit.is_alive()
        time.sleep(0.002)
    serve.stop(signal.SIGKILL)
    commit.join(60)
    c.close()
    c = restart(serve)
    with pytest.raises(NotFound):
        c.stat("big-committed")
    assert c.stat("big").kind == "active"          # the interrupted commit left the active snapshot whole
    assert not any(staging.iterdir())              # the restart removed the half-built layer
    assert c.commit("big-committed", "big").kind == "committed"
    c.view("check", "big-committed")
    perform(c.mounts("check"), mp)
    try:
        assert sorted(os.listdir(mp)) == sorted(f"d{d}" for d in range(40))
        assert all(len(os.listdir(mp / f"d{d}")) == 100 for d in range(40))
        assert (mp / "d39" / "f99").read_bytes() == b"x" * 3000
    finally:
        umount(mp)
    c.remove("check")
    c.cleanup()
    fsck_clean(serve.root)
    assert store_mounts(serve.root) == []
    c.close()


def _ignore(fn, *args) -> None:
    try:
        fn(*args)
    except FusesnapError:
        pass


def test_restart_finds_its_mounts_and_makes_lost_ones_again(serve):
    """The daemon's own mounts (bind mode) are separate processes: alive across a kill -9 of the
    daemon, made again at start-up if gone, and again on Mounts if their process died."""
    c = RemoteSnapshotter(serve.address)
    c.wait_ready(30)
    alive = Path(c.prepare("alive")[0].source)
    lost = Path(c.prepare("lost")[0].source)
    (alive / "a").write_text("a")
    (lost / "l").write_text("l")
    serve.stop(signal.SIGKILL)
    c.close()
    assert (alive / "a").read_text() == "a"        # served on without the daemon
    umount(lost)                                    # as after a reboot
    c = restart(serve)
    assert os.path.ismount(lost) and (lost / "l").read_text() == "l"
    assert [m.source for m in c.mounts("alive")] == [str(alive)]
    c.remove("lost")
    pids = wait_for(lambda: fuse_daemons(serve.root), 10, "the mount's daemon")
    assert len(pids) == 1                           # the one serving "alive"
    os.kill(pids[0], signal.SIGKILL)                # the mount's process dies: the mount is dead
    deadline = time.monotonic() + 10
    while True:
        try:
            os.statvfs(alive)
        except OSError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [m.source for m in c.mounts("alive")] == [str(alive)]
    assert (alive / "a").read_text() == "a"
    c.remove("alive")
    assert store_mounts(serve.root) == [] and not alive.exists() and not lost.exists()
    fsck_clean(serve.root)
    c.close()

