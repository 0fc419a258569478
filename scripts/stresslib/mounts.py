"""Live mounts under stress: the daemon killed while a writer fsyncs new files (every
acknowledged file must be in the upper afterwards), and an fsx-style load (random
read/write/truncate/mmap by several workers, each checked against an in-memory model,
then again after a remount and in the committed layer)."""

from __future__ import annotations

import io
import mmap
import os
import random
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

from fusesnap.snapshots.snapshotter import Snapshotter

from .common import Cli, Model, StressFailure, diff_digest, invariants, repaired_and_clean, run_all, run_until, sha

MAX_FILE = 256 << 10
MAX_IO = 64 << 10


def is_mounted(mp: Path) -> bool:
    target = os.fsencode(os.path.realpath(mp))
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


def daemon_pids(mp: Path) -> list[int]:
    """Processes whose command line mounts mp (the daemon keeps the mount command's argv)."""
    want = os.fsencode(str(mp))
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mount" in argv and want in argv:
                out.append(int(d))
    return out


def unmount(cli: Cli, mp: Path) -> None:
    r = cli.run("umount", str(mp))
    if is_mounted(mp):
        subprocess.run(["umount", "-l", str(mp)], capture_output=True)
    if is_mounted(mp):
        raise StressFailure(f"cannot unmount {mp}: {r.stderr.decode().strip()}")


def kill_daemons(cli: Cli, rnd: random.Random, n: int, model: Model, work: Path) -> tuple[int, int]:
    """n mounts whose daemon is SIGKILLed under a writer; returns (kills, acknowledged files checked)."""
    mp = work / "mp-daemon"
    mp.mkdir(exist_ok=True)
    checked = 0
    for i in range(n):
        key = f"m{i}"
        with Snapshotter(cli.root) as sn:
            sn.prepare(key, rnd.choice([""] + sorted(model.layers)))
        cli.ok("mount", key, str(mp))
        pids = daemon_pids(mp)
        if not pids:
            raise StressFailure(f"mount {i}: no daemon found for {mp}")
        acked: dict[str, bytes] = {}
        wr = random.Random(rnd.getrandbits(64))
        stop = threading.Event()

        def writer() -> None:
            j = 0
            while not stop.is_set():
                data = wr.randbytes(wr.choice((10, 5000, 200_000)))
                name = f"f{j}"
                try:
                    fd = os.open(mp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view):]
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                except OSError:
                    return  # the daemon is gone: ENOTCONN
                acked[name] = data
                j += 1

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(rnd.uniform(0.02, 0.6))
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        stop.set()
        t.join(timeout=60)
        unmount(cli, mp)
        with Snapshotter(cli.root) as sn:
            upper = sn.upper_dir(key)
        for name, data in acked.items():
            try:
                got = (upper / name).read_bytes()
            except FileNotFoundError:
                got = None
            if got != data:
                raise StressFailure(f"daemon kill {i}: acknowledged file {name} lost or changed")
            checked += 1
        invariants(cli.root, f"daemon kill {i}")
        model.actives[key] = diff_digest(cli.root, key)
        repaired_and_clean(cli, f"daemon kill {i}")
        model.verify(cli.root, f"daemon kill {i}")
    return n, checked


class _Worker:
    """One fsx worker: its own file in the mount and the bytes that file must hold."""

    def __init__(self, mp: Path, w: int, seed: int) -> None:
        self.path = mp / f"fsx{w}"
        self.rnd = random.Random(seed)
        self.model = bytearray()
        self.ops = 0
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.error: str | None = None

    def fail(self, what: str) -> None:
        raise StressFailure(f"fsx {self.path.name} op {self.ops}: {what}")

    def step(self) -> None:
        r = self.rnd
        m = self.model
        op = r.choices(("write", "read", "truncate", "mmap-write", "mmap-read", "fsync", "reopen", "stat"),
                       (30, 25, 10, 10, 10, 5, 5, 5))[0]
        if op == "write":
            off = r.randrange(0, MAX_FILE)
            data = r.randbytes(r.randrange(1, MAX_IO))
            data = data[:MAX_FILE - off] or b"x"
            os.pwrite(self.fd, data, off)
            if off > len(m):
                m.extend(bytes(off - len(m)))
            m[off:off + len(data)] = data
        elif op == "read":
            off = r.randrange(0, max(len(m), 1))
            n = r.randrange(1, MAX_IO)
            got = os.pread(self.fd, n, off)
            if got != bytes(m[off:off + n]):
                self.fail(f"read {n} at {off}: {len(got)} bytes differ from the model")
        elif op == "truncate":
            size = r.randrange(0, MAX_FILE)
            os.ftruncate(self.fd, size)
            if size < len(m):
                del m[size:]
            else:
                m.extend(bytes(size - len(m)))
        elif op in ("mmap-write", "mmap-read") and len(m) > 0:
            off = r.randrange(0, len(m))
            n = min(r.randrange(1, MAX_IO), len(m) - off)
            with mmap.mmap(self.fd, len(m)) as mm:
                if op == "mmap-write":
                    data = r.randbytes(n)
                    mm[off:off + n] = data
                    mm.flush()
                    m[off:off + n] = data
                elif mm[off:off + n] != bytes(m[off:off + n]):
                    self.fail(f"mmap read {n} at {off} differs from the model")
        elif op == "fsync":
            os.fsync(self.fd)
        elif op == "reopen":
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_RDWR)
        elif op == "stat":
            if os.fstat(self.fd).st_size != len(m):
                self.fail(f"size {os.fstat(self.fd).st_size}, model {len(m)}")
        self.ops += 1

    def run(self, deadline: float) -> None:
        self.error = run_until(deadline, self.step)

    def close(self) -> None:
        os.close(self.fd)


def check_files(workers: list[_Worker], where: str) -> None:
    for w in workers:
        if w.path.read_bytes() != bytes(w.model):
            raise StressFailure(f"{where}: {w.path.name} differs from the model")


def fsx(cli: Cli, rnd: random.Random, nworkers: int, seconds: float, model: Model, work: Path) -> int:
    mp = work / "mp-fsx"
    mp.mkdir(exist_ok=True)
    with Snapshotter(cli.root) as sn:
        sn.prepare("fsx", rnd.choice([""] + sorted(model.layers)))
    cli.ok("mount", "fsx", str(mp))
    try:
        workers = [_Worker(mp, w, rnd.getrandbits(64)) for w in range(nworkers)]
        try:
            run_all(workers, seconds)
        finally:
            for w in workers:
                w.close()
        check_files(workers, "fsx in the mount")
    finally:
        unmount(cli, mp)
    cli.ok("mount", "fsx", str(mp))
    try:
        check_files(workers, "fsx after a remount")
    finally:
        unmount(cli, mp)
    cli.ok("commit", "fsx-layer", "fsx")
    exported = cli.ok("export", "fsx-layer")
    tar = tarfile.open(fileobj=io.BytesIO(exported))
    for w in workers:
        f = tar.extractfile(w.path.name)
        if f is None or f.read() != bytes(w.model):
            raise StressFailure(f"fsx: {w.path.name} in the committed layer differs from the model")
    model.commits["fsx-layer"] = sha(exported)
    repaired_and_clean(cli, "fsx")
    model.verify(cli.root, "fsx")
    return sum(w.ops for w in workers)
