"""What every stress phase shares: running the CLI, seeded tars, the model of what was
acknowledged, and the checks that must hold after every crash."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fusesnap.snapshots.snapshotter import Snapshotter


class StressFailure(Exception):
    """A broken promise: the message says which, with the seed to replay it."""


def log(msg: str) -> None:
    print(f"stress: {msg}", file=sys.stderr, flush=True)


@dataclass
class Cli:
    """The fusesnap console script of one store root."""

    bin_dir: Path
    root: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    def argv(self, *args: str) -> list[str]:
        return [str(self.bin_dir / "fusesnap"), "--root", str(self.root), *args]

    def run(self, *args: str, input: bytes | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), input=input, capture_output=True, timeout=timeout,
                              env=env or self.env)

    def ok(self, *args: str, input: bytes | None = None) -> bytes:
        r = self.run(*args, input=input)
        if r.returncode != 0:
            raise StressFailure(f"`fusesnap {' '.join(args)}` failed: {r.stderr.decode().strip()}")
        return r.stdout

    def killed(self, rnd: random.Random, within: float, *args: str, input_path: Path | None = None) \
            -> tuple[int, bytes]:
        """Run a command and SIGKILL it after a random part of `within` seconds; (rc, stderr)."""
        stdin = open(input_path, "rb") if input_path else subprocess.DEVNULL
        try:
            p = subprocess.Popen(self.argv(*args), stdin=stdin, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, env=self.env)
            time.sleep(rnd.uniform(0, within))
            p.kill()
            _, err = p.communicate(timeout=120)
        finally:
            if input_path:
                stdin.close()
        return p.returncode, err


def run_until(deadline: float, step: Callable[[], None]) -> str | None:
    """Call step() until the deadline; the first broken promise (or OS error) as text, else None."""
    try:
        while time.monotonic() < deadline:
            step()
    except (StressFailure, OSError) as e:
        return str(e)
    return None


def run_all(workers: list, seconds: float) -> None:
    """Run each worker's run(deadline) in a thread of its own; raise the first worker's error."""
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=w.run, args=(deadline,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [w.error for w in workers if w.error]
    if errors:
        raise StressFailure(errors[0])


def one_line_error(r: subprocess.CompletedProcess, what: str) -> None:
    """rc 0, or rc 1 with exactly one line on stderr: never a signal or a traceback."""
    err = r.stderr.decode(errors="replace")
    if r.returncode not in (0, 1) or "Traceback" in err or (r.returncode and err.count("\n") != 1):
        raise StressFailure(f"{what}: rc {r.returncode}, stderr {err[-600:]!r}")


def random_tar(rnd: random.Random, members: int, big: bool = False) -> bytes:
    """A seeded layer tar: directories, files of mixed sizes, a symlink and a hard link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        dirs = [f"d{i}" for i in range(1 + members // 20)]
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
            t.addfile(ti)
        first = None
        for i in range(members):
            size = rnd.choice((0, 17, 600, 5000, 70_000, 400_000 if big else 9000))
            ti = tarfile.TarInfo(f"{rnd.choice(dirs)}/f{i}-{rnd.getrandbits(32):08x}")
            ti.size, ti.mode, ti.mtime = size, rnd.choice((0o644, 0o600, 0o755, 0o4755)), 1_600_000_000
            ti.uid, ti.gid = rnd.choice(((0, 0), (1000, 1000), (0, 42)))
            t.addfile(ti, io.BytesIO(rnd.randbytes(size)))
            first = first or ti.name
        ti = tarfile.TarInfo("d0/link")
        ti.type, ti.linkname = tarfile.SYMTYPE, "../" + (first or "x")
        t.addfile(ti)
        if first:
            ti = tarfile.TarInfo("d0/hard")
            ti.type, ti.linkname = tarfile.LNKTYPE, first
            t.addfile(ti)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_upper(rnd: random.Random, upper: Path, n: int) -> None:
    """Random changes in an (unmounted) upper directory, as a container would leave them."""
    for i in range(n):
        d = upper / f"u{rnd.randrange(4)}"
        d.mkdir(exist_ok=True)
        p = d / f"w{i}-{rnd.getrandbits(24):06x}"
        p.write_bytes(rnd.randbytes(rnd.choice((0, 100, 4096, 150_000))))
        os.chmod(p, rnd.choice((0o644, 0o600, 0o755)))
        if rnd.random() < 0.2:
            os.link(p, d / (p.name + ".link"))


def diff_digest(root: Path, key: str) -> str:
    with Snapshotter(root, finish=False) as sn:
        h = hashlib.sha256()
        cs = sn.changeset(key)
        try:
            for chunk in cs.chunks():
                h.update(chunk)
        finally:
            cs.restore()
        return "sha256:" + h.hexdigest()


def invariants(root: Path, where: str) -> None:
    """Right after a crash, before any repair: no layer shares an inode with a snapshot's upper,
    every snapshot reference is held by a snapshot."""
    with Snapshotter(root, finish=False) as sn:
        layer_inodes: set[tuple[int, int]] = set()
        for li in sn.store.list():
            layer_inodes |= _inodes(sn.store.layer_dir(li.chain_id) / "fs")
        for r in sn.db.all():
            if r.kind == "active" and _inodes(sn.snapshot_dir(r.id)) & layer_inodes:
                raise StressFailure(f"{where}: snapshot {r.name!r} shares an inode with a layer")
        holders = {r.holder for r in sn.db.all()}
        for chain, holder, _kind in sn.store.holders("snapshot:"):
            if holder not in holders:
                raise StressFailure(f"{where}: reference {holder} on {chain} is held by no snapshot")


def _inodes(d: Path) -> set[tuple[int, int]]:
    out = set()
    for dirpath, _dirs, files in os.walk(d):
        for n in files:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except FileNotFoundError:
                continue
            out.add((st.st_dev, st.st_ino))
    return out


def repaired_and_clean(cli: Cli, where: str) -> None:
    """fsck --repair mends what a crash left; fsck afterwards finds nothing."""
    r = cli.run("fsck", "--repair")
    one_line_error(r, f"{where}: fsck --repair")
    if r.returncode != 0:
        raise StressFailure(f"{where}: fsck --repair could not mend: {r.stdout.decode()[-800:]}")
    r = cli.run("--json", "fsck")
    rep = json.loads(r.stdout or b"{}")
    if r.returncode != 0 or not rep.get("ok") or rep.get("repaired"):
        raise StressFailure(f"{where}: fsck after repair: {rep}")


@dataclass
class Model:
    """What the store acknowledged: it must still hold every byte of it."""

    layers: dict[str, str] = field(default_factory=dict)  # chainID -> diffID of an acknowledged import
    commits: dict[str, str] = field(default_factory=dict)  # committed name -> diffID
    actives: dict[str, str] = field(default_factory=dict)  # active key -> digest of its changes

    def verify(self, root: Path, where: str) -> None:
        with Snapshotter(root) as sn:
            for chain, diff in self.layers.items():
                if not sn.store.exists(chain) or sn.store.get(chain).diff_id != diff:
                    raise StressFailure(f"{where}: acknowledged layer {chain} is gone or changed")
            for name, diff in self.commits.items():
                info = sn.stat(name)
                if info.kind != "committed" or sn.store.get(info.chain_id).diff_id != diff:
                    raise StressFailure(f"{where}: acknowledged commit {name!r} is gone or changed")
        for key, digest in self.actives.items():
            if diff_digest(root, key) != digest:
                raise StressFailure(f"{where}: the changes of active snapshot {key!r} changed")
