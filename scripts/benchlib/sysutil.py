"""Small OS helpers the benchmark needs: cache dropping, syncfs, mounts, FUSE daemons.

Everything here is stdlib only so that the benchmark runs with any Python 3.11.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


class BenchError(Exception):
    """A step or a target failed; the message becomes the "n/a" reason in the report."""


def is_root() -> bool:
    return os.geteuid() == 0


def drop_caches(enabled: bool = True) -> None:
    """`sync; echo 3 > /proc/sys/vm/drop_caches`: make the next step read from disk."""
    if not enabled:
        return
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def syncfs(path: Path | str) -> None:
    """syncfs(2) on the filesystem holding path (what `sync -f` does)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run a command; raise BenchError with the last line of stderr when it fails."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    try:
        p = subprocess.run(cmd, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{Path(cmd[0]).name} timed out after {timeout:.0f}s") from e
    except FileNotFoundError as e:
        raise BenchError(f"{cmd[0]}: command not found") from e
    if p.returncode != 0:
        msg = (p.stderr or p.stdout or "").strip().splitlines()
        last = msg[-1] if msg else ""
        raise BenchError(f"{Path(cmd[0]).name} {cmd[1] if len(cmd) > 1 else ''} exited {p.returncode}: {last}".strip())
    return p


def mountpoints() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4].encode().decode("unicode_escape") for line in f}


def is_mounted(path: Path | str) -> bool:
    return os.path.realpath(path) in mountpoints()


def wait_mounted(path: Path | str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(path):
            return
        if proc is not None and proc.poll() is not None and not is_mounted(path):
            raise BenchError(f"mount program exited {proc.returncode} before {path} was mounted")
        time.sleep(0.005)
    raise BenchError(f"{path} not mounted after {timeout:.0f}s")


def unmount(path: Path | str, timeout: float = 30.0) -> None:
    """Unmount (FUSE or kernel) and wait until gone; lazy unmount as the last resort."""
    path = str(path)
    if not is_mounted(path):
        return
    for cmd in (["fusermount3", "-u", path], ["umount", path], ["umount", "-l", path]):
        subprocess.run(cmd, capture_output=True, timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not is_mounted(path):
                return
            time.sleep(0.01)
    raise BenchError(f"could not unmount {path}")


def fuse_connection(path: Path | str) -> str | None:
    """The /sys/fs/fuse/connections entry of a FUSE mount (its device minor)."""
    try:
        return str(os.minor(os.stat(path).st_dev))
    except OSError:
        return None


def abort_fuse(conn: str | None) -> bool:
    """Abort a hung FUSE connection so that blocked syscalls return (ENOTCONN)."""
    if conn is None:
        return False
    ctl = Path("/sys/fs/fuse/connections")
    if not (ctl / conn).exists() and is_root():
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(ctl)], capture_output=True)
    try:
        (ctl / conn / "abort").write_text("1\n")
        return True
    except OSError:
        return False


def find_daemon(mountpoint: Path | str, exclude: set[int] | None = None) -> int | None:
    """Pid of the process serving a FUSE mount: the one whose argv names the mount point
    and that holds /dev/fuse open."""
    target = os.path.realpath(mountpoint)
    mine = {os.getpid()} | (exclude or set())
    found: list[int] = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in mine:
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not any(a and os.path.realpath(a.decode(errors="replace")) == target for a in argv[1:]):
            continue
        try:
            fds = os.listdir(f"/proc/{d}/fd")
            holds = any(os.readlink(f"/proc/{d}/fd/{fd}") == "/dev/fuse" for fd in fds)
        except OSError:
            holds = False
        if holds:
            found.append(int(d))
    return min(found) if found else None


def rss_mb(pid: int | None) -> float:
    """VmRSS of pid in MB (10^6 bytes)."""
    return _proc_kb_field(pid, "status", "VmRSS:") * 1024 / 1e6


def pss_mb(pid: int | None) -> float:
    """Proportional set size of pid (smaps_rollup) in MB (10^6 bytes)."""
    return _proc_kb_field(pid, "smaps_rollup", "Pss:") * 1024 / 1e6


MOUNT_SERVER_COMM = "fusesnap-mountd"


def with_mount_servers(pids: list[int]) -> set[int]:
    """pids plus the mount servers they were forked from and those servers' spare
    workers: what a mount costs in proportional memory is shared with them."""
    procs = set(pids)
    for pid in pids:
        parent = _ppid(pid)
        if parent > 1 and _comm(parent) == MOUNT_SERVER_COMM:
            procs.add(parent)
            procs.update(c for c in _children(parent) if _comm(c) == MOUNT_SERVER_COMM)
    return procs


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _proc_kb_field(pid: int | None, name: str, field: str) -> int:
    """A "FIELD: N kB" line of /proc/PID/NAME."""
    if pid is None:
        raise BenchError("daemon process not found")
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError as e:
        raise BenchError(f"cannot read /proc/{pid}/{name}: {e}") from e
    raise BenchError(f"no {field} for pid {pid}")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time pid has used so far, in seconds."""
    if pid is None:
        raise BenchError("daemon process not found")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError as e:
        raise BenchError(f"cannot read /proc/{pid}/stat: {e}") from e
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def call_with_timeout(fn: Callable[[], T], timeout: float, on_timeout: Callable[[], None]) -> T:
    """Run fn in a thread; after timeout call on_timeout (e.g. abort the FUSE connection
    that the step is stuck on) and raise BenchError. A wedged daemon never hangs the run."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        on_timeout()
        t.join(30)
        raise BenchError(f"step timed out after {timeout:.0f}s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def rmtree(path: Path | str) -> None:
    """Remove a scratch tree, refusing to descend into anything still mounted below it."""
    path = os.path.realpath(path)
    if not os.path.lexists(path):
        return
    inside = [m for m in mountpoints() if m == path or m.startswith(path + "/")]
    for m in sorted(inside, key=len, reverse=True):
        unmount(m)
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--one-file-system", path], capture_output=True)


def fallocate(path: Path | str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
