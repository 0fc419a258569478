"""The filesystems under test, each mounting the same lowers behind one interface.

A target that is missing or fails to mount is reported as "n/a" with the
reason; it never stops the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .build import Stack, overlay_mount
from .sysutil import BenchError, fallocate, find_daemon, fuse_connection, is_mounted, is_root, rmtree, run, unmount

BIG_FILE_FALLOCATE = 64 << 20  # plain rw copies: files this big are fallocated, not copied


@dataclass
class Mounted:
    """A live mount (or the plain directory standing in for one)."""

    root: Path  # where steps work
    scratch: Path  # upper/work/mountpoint live here; removed after unmount
    mountpoint: Path | None = None
    pid: int | None = None  # FUSE daemon
    conn: str | None = None  # /sys/fs/fuse/connections/<conn>
    mount_seconds: float | None = None  # the mount command alone, from start to live mount
    first_stat_seconds: float | None = None  # from the command's start to a stat of `probe` answered
    extra: dict[str, str] = field(default_factory=dict)


class Target:
    """One filesystem under test."""

    name = "?"
    has_daemon = False
    mounts = True  # False: the plain directory (no mount, no mount time)

    def unavailable(self) -> str | None:
        """Why this target cannot run here, or None."""
        return None

    def mount(self, stack: Stack, scratch: Path, writable: bool, probe: str | None = None) -> Mounted:
        """Mount stack; with probe (a path in it), stat it right after the command returned."""
        raise NotImplementedError

    def unmount(self, m: Mounted) -> None:
        if m.mountpoint is not None:
            unmount(m.mountpoint)
        rmtree(m.scratch)

    def cleanup(self) -> None:
        """End of run: release whatever the target kept between mounts."""


def first_stat(mnt: Path, probe: str | None, t0: float) -> float | None:
    """Seconds from t0 until a stat of probe inside the fresh mount was answered."""
    if probe is None:
        return None
    os.stat(mnt / probe)
    return time.perf_counter() - t0


def _dirs(scratch: Path) -> tuple[Path, Path, Path]:
    upper, work, mnt = scratch / "upper", scratch / "work", scratch / "mnt"
    for d in (upper, work, mnt):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(scratch, 0o755)
    return upper, work, mnt


class Plain(Target):
    """The merged tree copied flat into an ordinary directory: the baseline."""

    name = "plain"
    mounts = False

    def mount(self, stack: Stack, scratch: Path, writable: bool, probe: str | None = None) -> Mounted:
        scratch.mkdir(parents=True, exist_ok=True)
        if not writable:
            return Mounted(root=Path(stack.flat), scratch=scratch)
        root = scratch / "root"
        root.mkdir()
        # A private writable copy. Huge files are fallocated (same size, same extents
        # to free or append to) instead of copied, to keep the untimed setup short.
        for e in os.scandir(stack.flat):
            st = e.stat(follow_symlinks=False)
            if e.is_file(follow_symlinks=False) and st.st_size >= BIG_FILE_FALLOCATE:
                fallocate(root / e.name, st.st_size)
            else:
                run(["cp", "-a", e.path, str(root)], timeout=3600)
        return Mounted(root=root, scratch=scratch)


class KernelOverlay(Target):
    name = "kernel"

    def unavailable(self) -> str | None:
        if not is_root():
            return "kernel overlayfs needs root"
        if "overlay" not in Path("/proc/filesystems").read_text() and not shutil.which("modprobe"):
            return "no overlay filesystem in this kernel"
        return None

    def mount(self, stack: Stack, scratch: Path, writable: bool, probe: str | None = None) -> Mounted:
        upper, work, mnt = _dirs(scratch)
        t0 = time.perf_counter()
        overlay_mount(list(reversed(stack.lower_dirs)), mnt, upper, work)
        dt = time.perf_counter() - t0
        return Mounted(root=mnt, scratch=scratch, mountpoint=mnt, mount_seconds=dt,
                       first_stat_seconds=first_stat(mnt, probe, t0))


class FuseProgram(Target):
    """A fuse-overlayfs-compatible mount program: PROG -o lowerdir=..,upperdir=..,workdir=.. MNT."""

    has_daemon = True

    def __init__(self, name: str, program: str | None, extra_opts: str = "") -> None:
        self.name = name
        self.program = program
        self.extra_opts = extra_opts

    def unavailable(self) -> str | None:
        if not self.program:
            return f"{self.name}: command not found"
        if not Path("/dev/fuse").exists():
            return "no /dev/fuse"
        if not hasattr(self, "_probe"):
            # A program that cannot even print its help (e.g. a console script whose
            # module does not exist yet) is n/a once, instead of failing every mount.
            p = subprocess.run([self.program, "--help"], capture_output=True, text=True, timeout=60)
            err = (p.stderr or "").strip().splitlines()
            self._probe = None if p.returncode == 0 or "Traceback" not in p.stderr else f"{self.name} --help: {err[-1]}"
        return self._probe

    def mount(self, stack: Stack, scratch: Path, writable: bool, probe: str | None = None) -> Mounted:
        upper, work, mnt = _dirs(scratch)
        lowers = ":".join(str(p) for p in reversed(stack.lower_dirs))
        opts = f"lowerdir={lowers},upperdir={upper},workdir={work}"
        if self.extra_opts:
            opts += "," + self.extra_opts
        t0 = time.perf_counter()
        run([str(self.program), "-o", opts, str(mnt)], timeout=300)
        dt = time.perf_counter() - t0
        stat_dt = first_stat(mnt, probe, t0)
        if not is_mounted(mnt):
            raise BenchError(f"{self.name} returned but {mnt} is not mounted")
        return Mounted(root=mnt, scratch=scratch, mountpoint=mnt, pid=find_daemon(mnt), conn=fuse_connection(mnt),
                       mount_seconds=dt, first_stat_seconds=stat_dt)


class FusesnapStore(Target):
    """fusesnap's own path: layers imported into the store, a snapshot prepared on the
    chain, then `fusesnap mount`. Imports happen once per stack per run (untimed here;
    import speed is a workload of its own)."""

    name = "fusesnap"
    has_daemon = True

    def __init__(self, program: str | None, store_root: Path) -> None:
        self.program = program
        self.store = store_root
        self.chains: dict[str, str] = {}  # stack name -> top chainID
        self.failed: dict[str, str] = {}
        self.counter = 0
        self._checked: str | None | bool = False

    def cli(self, *args: str, timeout: float = 600, root: Path | None = None) -> subprocess.CompletedProcess:
        try:
            return run([str(self.program), "--root", str(root or self.store), *args], timeout=timeout)
        except BenchError as e:
            sub = next(a for a in args if not a.startswith("-"))
            raise BenchError(f"fusesnap {sub}: {str(e).split(': ', 1)[-1]}") from None

    def unavailable(self) -> str | None:
        if self._checked is not False:
            return self._checked  # type: ignore[return-value]
        reason: str | None = None
        if not self.program:
            reason = "fusesnap: command not found"
        else:
            missing = []
            for c in ("import", "export", "prepare", "mount", "umount", "remove"):
                p = subprocess.run([str(self.program), c, "--help"], capture_output=True, text=True, timeout=60)
                if p.returncode != 0:
                    missing.append(c)
            if missing:
                reason = f"fusesnap has no {', '.join(missing)} command yet"
        self._checked = reason
        return reason

    def import_chain(self, tars: list[str], root: Path | None = None) -> str:
        """Import tars bottom..top as a chain; return the top chainID."""
        parent: str | None = None
        for t in tars:
            args = ["--json", "import", t] + (["--parent", parent] if parent else [])
            out = self.cli(*args, root=root).stdout
            parent = parse_chain_id(out)
        assert parent is not None
        return parent

    def chain_of(self, stack: Stack) -> str:
        if stack.name in self.failed:
            raise BenchError(self.failed[stack.name])
        if stack.name not in self.chains:
            try:
                t0 = time.perf_counter()
                self.chains[stack.name] = self.import_chain(stack.tars)
                print(f"bench: fusesnap: imported {stack.name} ({len(stack.tars)} layers) in "
                      f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
            except BenchError as e:
                self.failed[stack.name] = f"import failed: {e}"
                raise BenchError(self.failed[stack.name]) from e
        return self.chains[stack.name]

    def mount(self, stack: Stack, scratch: Path, writable: bool, probe: str | None = None) -> Mounted:
        chain = self.chain_of(stack)
        _, _, mnt = _dirs(scratch)
        self.counter += 1
        key = f"bench-{os.getpid()}-{self.counter}"
        self.cli("prepare", key, chain)
        try:
            t0 = time.perf_counter()
            self.cli("mount", key, str(mnt), timeout=300)
            dt = time.perf_counter() - t0
            stat_dt = first_stat(mnt, probe, t0)
        except BenchError:
            self._remove(key)
            raise
        if not is_mounted(mnt):
            self._remove(key)
            raise BenchError(f"fusesnap mount returned but {mnt} is not mounted")
        return Mounted(root=mnt, scratch=scratch, mountpoint=mnt, pid=find_daemon(mnt),
                       conn=fuse_connection(mnt), extra={"key": key}, mount_seconds=dt, first_stat_seconds=stat_dt)

    def _remove(self, key: str) -> None:
        try:
            self.cli("remove", key)
        except BenchError as e:
            print(f"bench: fusesnap remove {key}: {e}", file=sys.stderr)

    def unmount(self, m: Mounted) -> None:
        if m.mountpoint is not None and is_mounted(m.mountpoint):
            try:
                self.cli("umount", str(m.mountpoint), timeout=120)
            except BenchError as e:
                print(f"bench: fusesnap umount: {e}; falling back to fusermount3", file=sys.stderr)
            unmount(m.mountpoint)
        if "key" in m.extra:
            self._remove(m.extra["key"])
        rmtree(m.scratch)

    def cleanup(self) -> None:
        rmtree(self.store)


def parse_chain_id(out: str) -> str:
    """chainID from `fusesnap --json import` (a JSON object) or from plain output."""
    out = out.strip()
    try:
        obj = json.loads(out)
        if isinstance(obj, list):
            obj = obj[-1]
        for k in ("chain_id", "chainID", "chainid"):
            if k in obj:
                return str(obj[k])
    except (ValueError, TypeError, IndexError):
        pass
    for tok in out.replace('"', " ").split():
        if tok.startswith("sha256:") and len(tok) == 71:
            return tok
    raise BenchError(f"no chainID in fusesnap import output: {out[:120]!r}")


def find_program(name: str, bindir: Path | None) -> str | None:
    """A console script: only in --fusesnap-bin when given; else next to this Python,
    then on PATH."""
    if bindir is not None:
        p = bindir / name
        return str(p) if p.exists() and os.access(p, os.X_OK) else None
    p = Path(sys.executable).parent / name
    if p.exists() and os.access(p, os.X_OK):
        return str(p)
    return shutil.which(name)


ALL_TARGETS = ("plain", "kernel", "fuse-overlayfs", "fusesnap-overlay", "fusesnap")
# on request (--targets): fusesnap-overlay -o writeback=1, the kernel's writeback cache
EXTRA_TARGETS = ("fusesnap-writeback",)


def make_targets(names: list[str], bindir: Path | None, store_root: Path) -> list[Target]:
    made: dict[str, Target] = {
        "plain": Plain(),
        "kernel": KernelOverlay(),
        "fuse-overlayfs": FuseProgram("fuse-overlayfs", shutil.which("fuse-overlayfs")),
        "fusesnap-overlay": FuseProgram("fusesnap-overlay", find_program("fusesnap-overlay", bindir)),
        "fusesnap-writeback": FuseProgram("fusesnap-writeback", find_program("fusesnap-overlay", bindir),
                                          "writeback=1"),
        "fusesnap": FusesnapStore(find_program("fusesnap", bindir), store_root),
    }
    return [made[n] for n in names]
