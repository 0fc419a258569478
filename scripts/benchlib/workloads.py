"""The measured steps. Each returns its value (seconds, MB/s or MB) and checks that the
target produced the right result: a fast wrong answer is an error, not a number."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .build import Workset
from .sysutil import BenchError, cpu_seconds, rss_mb, run, syncfs
from .targets import FusesnapStore, Mounted, Target

BUF = 1 << 20


@dataclass
class Ctx:
    """What a step sees: the mount, its target, the workloads, a scratch dir."""

    m: Mounted
    target: Target
    ws: Workset
    scratch: Path
    expect: dict[str, int]

    @property
    def root(self) -> Path:
        return self.m.root


@dataclass
class Workload:
    name: str  # id for --only
    title: str
    stack: str
    unit: str  # "s" (shown as ms), "MB/s", "MB"
    kind: str  # "ro": shared mount; "rw": fresh mount per run; "mount"; "tool"
    cold: bool
    step: Callable[[Ctx], float] | None = None
    setup: Callable[[Ctx], None] | None = None
    applies: Callable[[Target], str | None] | None = None
    timed_inside: bool = False  # the step times itself (returns a measured value)
    writable: bool = True  # "rw": a fresh mount with an empty upper per run; False: read-only use of it
    probe: str | None = None  # "mount": record the time until a stat of this path was answered
    finish: Callable[[], None] | None = None  # end of run: release what the steps kept between runs

    @property
    def higher_is_better(self) -> bool:
        return self.unit == "MB/s"


# ---------------------------------------------------------------- primitives


def walk(root: Path) -> tuple[int, int]:
    """scandir + lstat every entry; returns (entries, bytes of regular files)."""
    n = size = 0
    stack = [str(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                n += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
                elif stat.S_ISREG(st.st_mode):
                    size += st.st_size
    return n, size


def read_file(path: str, buf: bytearray) -> int:
    total = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        view = memoryview(buf)
        while True:
            k = os.readv(fd, [view])
            if k == 0:
                return total
            total += k
    finally:
        os.close(fd)


def read_all(root: Path) -> int:
    """Read every regular file in full; returns bytes read."""
    buf = bytearray(BUF)
    total = 0
    stack = [str(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    total += read_file(e.path, buf)
    return total


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise BenchError(f"wrong result: {msg}")


# ---------------------------------------------------------------- steps (timed by the runner)


def s_walk(c: Ctx) -> float:
    n, _ = walk(c.root)
    check(n == c.expect["rootfs_entries"], f"walk saw {n} entries, the merged tree has {c.expect['rootfs_entries']}")
    return 0.0


def s_read_all(c: Ctx) -> float:
    b = read_all(c.root)
    check(b == c.expect["rootfs_bytes"], f"read {b} bytes, the merged tree has {c.expect['rootfs_bytes']}")
    return 0.0


def s_seqread(c: Ctx) -> float:
    t0 = time.perf_counter()
    b = read_file(str(c.root / c.ws.big_file), bytearray(BUF))
    dt = time.perf_counter() - t0
    check(b == c.ws.scale.big_bytes, f"read {b} bytes of {c.ws.scale.big_bytes}")
    return b / 1e6 / dt


def s_lookup(c: Ctx) -> float:
    for f in c.ws.chain_bottom_files:
        st = os.stat(c.root / f)
        check(stat.S_ISREG(st.st_mode), f"{f} is not a file")
    return 0.0


def s_readdir(c: Ctx) -> float:
    n = len(os.listdir(c.root / "d"))
    check(n == c.ws.scale.dir_entries, f"readdir gave {n} names of {c.ws.scale.dir_entries}")
    return 0.0


def s_readdir_stat(c: Ctx) -> float:
    n = 0
    with os.scandir(c.root / "d") as it:
        for e in it:
            e.stat(follow_symlinks=False)
            n += 1
    check(n == c.ws.scale.dir_entries, f"readdir gave {n} names of {c.ws.scale.dir_entries}")
    return 0.0


def s_create(c: Ctx) -> float:
    d = c.root / "created"
    os.mkdir(d)
    payload = b"x" * c.ws.scale.small_size
    for i in range(c.ws.scale.create_files):
        fd = os.open(d / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
    syncfs(d)
    return 0.0


def s_untar(c: Ctx) -> float:
    d = c.root / "untar"
    os.mkdir(d)
    run(["tar", "--numeric-owner", "-xf", c.ws.rootfs_tar, "-C", str(d)], timeout=3600)
    return 0.0


def s_untar_cpu(c: Ctx) -> float:
    """The daemon's CPU time for the untar: what busy polling and Python cost."""
    c0 = cpu_seconds(c.m.pid)
    s_untar(c)
    return cpu_seconds(c.m.pid) - c0


def s_copyup(c: Ctx) -> float:
    p = c.root / c.ws.big_file
    with open(p, "ab") as f:
        f.write(b"x")
    return 0.0


def post_copyup(c: Ctx) -> None:
    check(os.stat(c.root / c.ws.big_file).st_size == c.ws.scale.big_bytes + 1, "append did not grow the file")


def s_delete(c: Ctx) -> float:
    os.unlink(c.root / c.ws.big_file)
    return 0.0


def s_rmrf(c: Ctx) -> float:
    run(["rm", "-rf", str(c.root / "t")], timeout=3600)
    check(not os.path.lexists(c.root / "t"), "tree still there after rm -rf")
    return 0.0


def s_rss(c: Ctx) -> float:
    walk(c.root)
    return rss_mb(c.m.pid)


# ---------------------------------------------------------------- tool steps (import/export)


def only_tool_targets(t: Target) -> str | None:
    if t.name in ("plain", "fusesnap"):
        return None
    return "not a layer store"


def s_import(c: Ctx) -> float:
    """plain: GNU tar extraction of the rootfs tar; fusesnap: `fusesnap import` of it."""
    if isinstance(c.target, FusesnapStore):
        store = c.scratch / "store"
        t0 = time.perf_counter()
        c.target.import_chain([c.ws.rootfs_tar], root=store)
        return time.perf_counter() - t0
    d = c.scratch / "x"
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    run(["tar", "--numeric-owner", "-xf", c.ws.rootfs_tar, "-C", str(d)], timeout=3600)
    return time.perf_counter() - t0


def setup_export(c: Ctx) -> None:
    if isinstance(c.target, FusesnapStore):
        c.m.extra["chain"] = c.target.import_chain([c.ws.rootfs_tar], root=c.scratch / "store")


def s_export(c: Ctx) -> float:
    """plain: GNU tar of the extracted base layer; fusesnap: `fusesnap export` (checked
    byte for byte against the imported tar)."""
    out = c.scratch / "out.tar"
    if isinstance(c.target, FusesnapStore):
        with open(out, "wb") as f:
            t0 = time.perf_counter()
            p = subprocess.run([str(c.target.program), "--root", str(c.scratch / "store"), "export", c.m.extra["chain"]],
                               stdout=f, stderr=subprocess.PIPE, text=False, timeout=3600)
            dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise BenchError(f"fusesnap export exited {p.returncode}: {p.stderr.decode(errors='replace').strip()[-200:]}")
        check(_same_file(out, Path(c.ws.rootfs_tar)), "export differs from the imported tar")
        return dt
    base = c.ws.stacks["base"].flat
    t0 = time.perf_counter()
    run(["tar", "--numeric-owner", "-cf", str(out), "-C", base, "."], timeout=3600)
    return time.perf_counter() - t0


def _same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(BUF), fb.read(BUF)
            if x != y:
                return False
            if not x:
                return True


def needs_daemon(t: Target) -> str | None:
    return None if t.has_daemon else "no daemon"


def needs_mount(t: Target) -> str | None:
    return None if t.mounts else "not a mount"


WORKLOADS: list[Workload] = [
    Workload("walk-cold", "rootfs walk (scandir+lstat), cold", "rootfs", "s", "ro", True, s_walk),
    Workload("walk-warm", "rootfs walk (scandir+lstat), warm", "rootfs", "s", "ro", False, s_walk),
    Workload("read-cold", "rootfs read all files, cold", "rootfs", "s", "ro", True, s_read_all),
    Workload("read-warm", "rootfs read all files, warm", "rootfs", "s", "ro", False, s_read_all),
    Workload("rss", "daemon RSS after rootfs walk", "rootfs", "MB", "ro", True, s_rss,
             applies=needs_daemon, timed_inside=True),
    Workload("seqread-cold", "2 GiB sequential read, cold", "big", "MB/s", "ro", True, s_seqread, timed_inside=True),
    Workload("seqread-warm", "2 GiB sequential read, warm", "big", "MB/s", "ro", False, s_seqread, timed_inside=True),
    Workload("lookup-cold", "stat files at the bottom of a 100-layer chain, cold", "chain", "s", "ro", True, s_lookup),
    Workload("readdir-cold", "readdir of 100k entries, cold", "dir", "s", "ro", True, s_readdir),
    Workload("readdir-warm", "readdir of 100k entries, warm", "dir", "s", "ro", False, s_readdir),
    Workload("readdirstat-cold", "readdir+stat of 100k entries, cold", "dir", "s", "ro", True, s_readdir_stat),
    Workload("readdirstat-warm", "readdir+stat of 100k entries, warm", "dir", "s", "ro", False, s_readdir_stat),
    Workload("create", "create 10k x 4 KiB files + syncfs", "empty", "s", "rw", False, s_create),
    Workload("untar", "untar the rootfs into an empty mount", "empty", "s", "rw", False, s_untar),
    Workload("untar-cpu", "daemon CPU (user+sys) during the untar", "empty", "s", "rw", False, s_untar_cpu,
             applies=needs_daemon, timed_inside=True),
    Workload("copyup", "copy-up of a 2 GiB lower file (append 1 byte)", "big", "s", "rw", True, s_copyup),
    Workload("delete", "delete a 2 GiB lower file", "big", "s", "rw", True, s_delete),
    Workload("rmrf", "rm -rf a 10k-file lower tree", "tree", "s", "rw", True, s_rmrf),
    Workload("import", "import rootfs tar (plain: GNU tar -x)", "base", "s", "tool", False, s_import,
             applies=only_tool_targets, timed_inside=True),
    Workload("export", "export rootfs tar (plain: GNU tar -c)", "base", "s", "tool", False, s_export,
             setup=setup_export, applies=only_tool_targets, timed_inside=True),
]  # the start-up, fresh-mount and memory rows: startup_bench.WORKLOADS

POST_CHECKS: dict[str, Callable[[Ctx], None]] = {"copyup": post_copyup}


def titles_for(ws: Workset) -> dict[str, str]:
    """Workload titles with the real sizes of this scale (tiny runs say so)."""
    s = ws.scale
    big = f"{s.big_bytes / (1 << 30):g} GiB" if s.big_bytes >= 1 << 30 else f"{s.big_bytes >> 20} MiB"
    out = {}
    for w in WORKLOADS:
        t = w.title.replace("2 GiB", big).replace("stat files", f"stat {len(ws.chain_bottom_files)} files").replace("100-layer", f"{s.chain_layers}-layer")
        t = t.replace("100 layers", f"{s.chain_layers} layers").replace("100k entries", f"{s.dir_entries} entries")
        t = t.replace("10k x", f"{s.create_files} x").replace("10k-file", f"{s.tree_dirs * s.tree_files_per_dir}-file")
        out[w.name] = t
    return out
