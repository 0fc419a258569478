"""A program's cold start on a store mount, without and with `fusesnap warm` first.

The image: the rootfs stack's layers plus one layer holding Debian's python3, its
standard library and the shared objects it loads, self-contained under /opt/benchpy
(busybox as its sh, the dynamic loader named by a wrapper script), so it runs on any
rootfs. The program, run in bwrap on the mount: `sh -c 'python3 -c "import json,
email.parser, http.client, ..."'`. Its access record is made once per run on a recorded
mount (untimed). Every row starts with the caches dropped (`sync; echo 3 >
/proc/sys/vm/drop_caches`, by the runner); in the first three the mount is made after
that and not timed:
- cold start: the program alone (plain: the same files in a directory);
- cold start after warm-up: `fusesnap warm KEY --record FILE` (not timed), then the program;
- warm-up: `fusesnap warm` alone, the whole command;
- from cold, mount and program together, without and with `fusesnap warm` started in the
  background just before the mount (the program does not wait for it).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from .build import Workset
from .sysutil import BenchError, rmtree, run
from .targets import FusesnapStore, Plain, Target
from .workloads import Ctx, Workload, check, only_tool_targets

PREFIX = "opt/benchpy"
MODULES = ("json, email.parser, http.client, decimal, asyncio, argparse, logging, subprocess, "
           "xml.etree.ElementTree, sqlite3, zipfile, tarfile")
PROGRAM = f"python3 -c 'import {MODULES}; print(\"started\")'"
# Parts of the standard library no import above reads and that only make the layer big.
_SKIP = {"test", "lib2to3", "ensurepip", "pydoc_data", "idlelib", "tkinter", "turtledemo", "site-packages",
         "dist-packages"}


def _log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _libs(binary: Path) -> set[str]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    return {m.group(1) for m in re.finditer(r"(/\S+) \(0x", out)}


def _build_layer(tar_path: Path) -> None:
    """The python layer tar: interpreter, standard library, every library they load."""
    python = Path(os.path.realpath("/usr/bin/python3"))
    stdlib = Path("/usr/lib") / python.name
    busybox = shutil.which("busybox")
    if not python.name.startswith("python3.") or not stdlib.is_dir() or not busybox:
        raise BenchError("needs Debian's python3 and busybox-static (scripts/setup installs them)")
    libs = _libs(python)
    for so in (stdlib / "lib-dynload").glob("*.so"):
        libs |= _libs(so)
    loader = next((p for p in libs if "/ld-linux" in p), None)
    if loader is None:
        raise BenchError(f"ldd names no dynamic loader for {python}")
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, host: Path | None = None, data: bytes | None = None, mode: int = 0o755) -> None:
            if host is not None:
                ti = tf.gettarinfo(str(host), arcname=name)
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = ""
                with open(host, "rb") as f:
                    tf.addfile(ti, f)
                return
            ti = tarfile.TarInfo(name)
            ti.mode, ti.mtime = mode, 1_700_000_000
            if data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))

        for d in ("opt", PREFIX, f"{PREFIX}/bin", f"{PREFIX}/lib"):
            add(d)
        add(f"{PREFIX}/bin/{python.name}", Path(python))
        add(f"{PREFIX}/bin/sh", Path(os.path.realpath(busybox)))
        ld = Path(loader).name
        add(f"{PREFIX}/bin/python3", data=(f"#!/{PREFIX}/bin/sh\nexec /{PREFIX}/lib/{ld} --library-path /{PREFIX}/lib "
                                           f"/{PREFIX}/bin/{python.name} \"$@\"\n").encode())
        for lib in sorted(libs):
            add(f"{PREFIX}/lib/{Path(lib).name}", Path(os.path.realpath(lib)))
        base = f"{PREFIX}/lib/{python.name}"
        for dirpath, dirnames, filenames in os.walk(stdlib):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP and not d.startswith("config-"))
            rel = os.path.relpath(dirpath, stdlib)
            here = base if rel == "." else f"{base}/{rel}"
            add(here)
            for f in sorted(filenames):
                p = Path(dirpath) / f
                if p.is_file() and not p.is_symlink():     # symlinks out of the tree (sitecustomize) stay out
                    add(f"{here}/{f}", p)
    os.replace(tmp, tar_path)


class PythonImage:
    """Built once per workload cache (the layer tar and its files in a directory), imported
    and recorded once per fusesnap store."""

    def __init__(self) -> None:
        self.ws: Workset | None = None
        self.chains: dict[str, str] = {}       # store root -> top chainID
        self.records: dict[str, Path] = {}      # store root -> record file

    def ensure(self, ws: Workset) -> "PythonImage":
        if self.ws is ws:
            return self
        if not shutil.which("bwrap"):
            raise BenchError("bwrap is not installed (scripts/setup installs bubblewrap)")
        root = Path(ws.root)
        self.tar = root / "python-layer.tar"
        self.flat = root / "python-flat"
        if not self.tar.exists():
            _log("building the python layer for the start-up rows")
            _build_layer(self.tar)
        if not (self.flat / PREFIX).is_dir():
            rmtree(self.flat)
            tmp = self.flat.with_name(self.flat.name + ".tmp")
            rmtree(tmp)
            tmp.mkdir(parents=True)
            run(["tar", "-xf", str(self.tar), "-C", str(tmp)], timeout=900)
            for d in ("dev", "proc", "tmp"):
                (tmp / d).mkdir()
            os.replace(tmp, self.flat)
        self.ws = ws
        return self

    def chain(self, t: FusesnapStore) -> str:
        key = str(t.store)
        if key not in self.chains:
            assert self.ws is not None
            below = t.chain_of(self.ws.stacks["rootfs"])
            out = t.cli("--json", "import", "--parent", below, str(self.tar)).stdout
            self.chains[key] = json.loads(out)["chain_id"]
        return self.chains[key]

    def record(self, t: FusesnapStore, scratch: Path) -> Path:
        """The program's access record on this store (made on first use, untimed)."""
        key = str(t.store)
        if key not in self.records:
            rec = t.store.with_name(t.store.name + "-python.record")
            with Mounted(t, self.chain(t), scratch / "record", record=rec) as mnt:
                start(mnt)
            s = json.loads(t.cli("record", "inspect", "--json", str(rec)).stdout)
            _log(f"python start-up record: {s['files']} files, {s['bytes'] / 1e6:.1f} MB")
            self.records[key] = rec
        return self.records[key]


IMAGE = PythonImage()


class Mounted:
    """A fresh active snapshot of `chain` mounted for one run, removed afterwards."""

    def __init__(self, t: FusesnapStore, chain: str, scratch: Path, record: Path | None = None) -> None:
        self.t, self.chain, self.record = t, chain, record
        self.mnt = scratch / "mnt"
        self.key = f"python-{scratch.name}"

    def prepare(self) -> None:
        """The snapshot and the mount point (done by __enter__ unless done before)."""
        if not self.mnt.is_dir():
            self.mnt.mkdir(parents=True)
            self.t.cli("prepare", self.key, self.chain)

    def __enter__(self) -> Path:
        self.prepare()
        self.t.cli("mount", *(["--record", str(self.record)] if self.record else []), self.key, str(self.mnt))
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        try:
            self.t.cli("umount", str(self.mnt), timeout=120)
        finally:
            self.t.cli("remove", self.key)


def start(root: Path) -> float:
    """Run the program in bwrap on `root`; its wall time."""
    cmd = ["bwrap", "--bind", str(root), "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
           "--unshare-all", "--die-with-parent", "--clearenv", "--setenv", "PATH", f"/{PREFIX}/bin",
           "--setenv", "PYTHONDONTWRITEBYTECODE", "1", f"/{PREFIX}/bin/sh", "-c", PROGRAM]
    t0 = time.perf_counter()
    p = run(cmd, timeout=300)
    dt = time.perf_counter() - t0
    check(p.stdout.strip() == "started", f"the program printed {p.stdout.strip()[:80]!r}")
    return dt


def warm(t: FusesnapStore, key: str, rec: Path) -> dict:
    res = json.loads(t.cli("--json", "warm", key, "--record", str(rec)).stdout)
    check(res["files"] > 0 and res["missing"] == 0, f"warm read {res['files']} files, missed {res['missing']}")
    return res


def setup(c: Ctx) -> None:
    img = IMAGE.ensure(c.ws)
    if isinstance(c.target, FusesnapStore):
        img.record(c.target, c.scratch)


def s_cold(c: Ctx) -> float:
    """The program alone, cold (plain: from the layer's files in a directory)."""
    if isinstance(c.target, Plain):
        return start(IMAGE.flat)
    assert isinstance(c.target, FusesnapStore)
    with Mounted(c.target, IMAGE.chain(c.target), c.scratch) as mnt:
        return start(mnt)


def s_after_warm(c: Ctx) -> float:
    """`fusesnap warm` (untimed), then the program, cold."""
    assert isinstance(c.target, FusesnapStore)
    m = Mounted(c.target, IMAGE.chain(c.target), c.scratch)
    with m as mnt:
        warm(c.target, m.key, IMAGE.record(c.target, c.scratch))
        return start(mnt)


def s_warm(c: Ctx) -> float:
    """`fusesnap warm` of the record alone, cold."""
    assert isinstance(c.target, FusesnapStore)
    t0 = time.perf_counter()
    warm(c.target, IMAGE.chain(c.target), IMAGE.record(c.target, c.scratch))
    return time.perf_counter() - t0


def setup_prepared(c: Ctx) -> None:
    """As setup, and the run's snapshot prepared before the caches are dropped."""
    setup(c)
    assert isinstance(c.target, FusesnapStore)
    Mounted(c.target, IMAGE.chain(c.target), c.scratch).prepare()


def s_mount_start(c: Ctx) -> float:
    """From cold: `fusesnap mount`, then the program (the unmount is not timed)."""
    assert isinstance(c.target, FusesnapStore)
    m = Mounted(c.target, IMAGE.chain(c.target), c.scratch)
    t0 = time.perf_counter()
    with m as mnt:
        start(mnt)
        return time.perf_counter() - t0


def s_mount_start_warming(c: Ctx) -> float:
    """From cold: `fusesnap warm` started in the background, `fusesnap mount` meanwhile, then
    the program at once (the warm-up may still run; its end is not waited for)."""
    assert isinstance(c.target, FusesnapStore)
    t = c.target
    m = Mounted(t, IMAGE.chain(t), c.scratch)
    rec = IMAGE.record(t, c.scratch)
    t0 = time.perf_counter()
    bg = subprocess.Popen([str(t.program), "--root", str(t.store), "warm", m.key, "--record", str(rec)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with m as mnt:
            start(mnt)
            return time.perf_counter() - t0
    finally:
        _, err = bg.communicate(timeout=300)
        check(bg.returncode == 0, f"fusesnap warm: {err.decode(errors='replace').strip()[-200:]}")


def only_store(t: Target) -> str | None:
    return None if t.name == "fusesnap" else "not a layer store"


RECORDER_WORKLOADS = [
    Workload("start-cold", "python start-up in bwrap, cold", "base", "s", "tool", True, s_cold, setup=setup,
             applies=only_tool_targets, timed_inside=True),
    Workload("start-warmed", "the same after `fusesnap warm` of its record (not timed)", "base", "s", "tool", True,
             s_after_warm, setup=setup, applies=only_store, timed_inside=True),
    Workload("warm-up", "`fusesnap warm` of that record, cold", "base", "s", "tool", True, s_warm, setup=setup,
             applies=only_store, timed_inside=True),
    Workload("mount-start", "`fusesnap mount` + python start-up, cold", "base", "s", "tool", True, s_mount_start,
             setup=setup_prepared, applies=only_store, timed_inside=True),
    Workload("mount-start-warming", "the same, `fusesnap warm` started alongside the mount", "base", "s", "tool",
             True, s_mount_start_warming, setup=setup_prepared, applies=only_store, timed_inside=True),
]
