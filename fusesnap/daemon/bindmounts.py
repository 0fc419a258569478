"""Daemon-made mounts: the daemon mounts each snapshot itself and hands containerd a `bind` of it.

containerd 1.6 performs a `fuse3.PROG` mount in the shim by running
mount.fuse3; the shim reaps every child that exits, so its own wait for the
helper often gets ECHILD, and containerd then unmounts the fresh mount and
runs the helper again (up to 10 times): two to seven FUSE start-ups per
`ctr run` here. A bind mount is one mount(2) call with no helper. So at
Prepare/View the daemon mounts the snapshot (a fresh `fusesnap mount`
process: pyfuse3 serves one filesystem per process, and forking a process
that runs gRPC threads is unsafe) at `<socket>.mounts/<hash of key>` and
returns `bind` of that directory; Commit and Remove unmount it first.

How a mount is made: by the mount server of the daemon's context
(cli/mountserver.py; the daemon starts it and keeps it from going idle), which forks a worker that has
everything imported and runs `fusesnap mount KEY DIR` in it: a Prepare pays for
the mount itself (~10 ms here), not for an interpreter's start-up (~150 ms),
and nothing is started between containers. Where no mount server can be used
(FUSESNAP_MOUNT_SERVER=0), mount processes are started ahead of need instead
(WarmPool, warmmount.py): one or two wait, imported and with their FUSE daemon
forked, and each used one is replaced shortly after its mount.

The mount daemons are separate processes: they outlive a restart of
`fusesnap serve`, which finds them in the mount table again; a mount that is
gone (a reboot, a killed mount daemon) is made again on the next Mounts call,
or at start-up for every snapshot whose mount directory is still there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from ..cli import mountclient
from ..cli.mountserver import PLANNED
from ..errors import FusesnapError, InUse
from ..fs.fuse.mount import planned_fuse_options
from ..linux import fuseconn, mountinfo
from ..snapshots.mounting import mount_plan, plan_options, umount
from ..snapshots.snapshotter import Info, Mount, Snapshotter
from .standby import Standby
from .unpack import options_for

log = logging.getLogger(__name__)

REFILL_DELAY = 0.25   # seconds after a mount before the pool starts its replacement
OUTCOME_WAIT = 60.0   # seconds Mounts waits for the worker of a mount made ahead to report


class WarmPool:
    """Mount processes (warmmount.py) started before they are needed, `size` of them idle at most."""

    def __init__(self, root: Path, size: int = 2) -> None:
        # -P: not the daemon's working directory first on sys.path (it may hold another fusesnap)
        self._argv = [sys.executable, "-P", "-m", "fusesnap.daemon.warmmount", str(root)]
        self._size = size
        self._idle: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._closed = False
        self.fill()

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def fill(self) -> None:
        with self._lock:
            while not self._closed and len(self._idle) < self._size:
                self._idle.append(self._start())

    def mount(self, key: str, mountpoint: Path) -> tuple[int, str]:
        """Mount snapshot `key` at mountpoint through a ready process: (exit code, stderr)."""
        with self._lock:
            proc = self._idle.pop(0) if self._idle else None
        if proc is None or proc.poll() is not None:   # none ready, or it died idle
            if proc is not None:
                proc.communicate()
            proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps([key, str(mountpoint)]) + "\n")
            proc.stdin.close()
        except BrokenPipeError:
            pass
        # its exit status as a line as soon as the mount is live: the process's own exit is
        # not waited for here (reaped in the background)
        status = proc.stdout.readline().strip()
        # The next one starts a little later: its start-up (an interpreter, imports, a forked
        # FUSE daemon) would otherwise take CPU from the container this mount is for.
        refill = threading.Timer(REFILL_DELAY, self.fill)
        refill.daemon = True
        refill.start()
        if status == "0":
            threading.Thread(target=_reap, args=(proc,), daemon=True).start()
            return 0, ""
        rc, err = _reap(proc)
        return (int(status) if status.isdigit() else rc or 1), err

    def close(self) -> None:
        """Let the idle processes go (an empty request: they exit without mounting)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for proc in idle:
            proc.communicate("")


def _mount_argv(root: Path, key: str, mountpoint: str) -> list[str]:
    return ["--root", str(root), "mount", *(f"-o{o}" for o in options_for(key)), key, mountpoint]


def _shown(argv: list[str]) -> list[str]:
    """The command line a mount's process shows in ps (not the serve command that asked for it)."""
    return [sys.executable, os.path.join(os.path.dirname(sys.executable), "fusesnap"), *argv]


def _mount_by_server(root: Path, key: str, mountpoint: Path) -> tuple[int, str] | None:
    """`fusesnap mount KEY MOUNTPOINT` run by the mount server: (exit code, its stderr),
    None if the server did not take it."""
    argv = _mount_argv(root, key, str(mountpoint))
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        rc = mountclient.run("fusesnap", argv, stdio=(null, null, err_w), orig_argv=_shown(argv))
    finally:
        os.close(null)
        os.close(err_w)
    err = _written(err_r)
    return None if rc is None else (rc, err)


def _written(err_r: int) -> str:
    """What a mount command wrote to the pipe before it reported (the mount's daemon,
    still running, no longer holds the pipe once it is live; its end is not waited for)."""
    try:
        os.set_blocking(err_r, False)
        chunks = []
        while True:
            try:
                chunk = os.read(err_r, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(err_r)
    return b"".join(chunks).decode(errors="replace")


def _last_line(err: str, rc: object) -> str:
    return (err.strip().splitlines() or [f"exit {rc}"])[-1].removeprefix("fusesnap: ")


def _reap(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for a mount process that was given its request: (exit code, what it wrote on stderr)."""
    assert proc.stdout is not None and proc.stderr is not None
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return proc.wait(), err


def _alive(mp: Path) -> bool:
    """Whether the FUSE daemon behind mp still answers (statfs always reaches it; stat may be cached)."""
    try:
        os.statvfs(mp)
    except OSError as e:
        return e.errno != errno.ENOTCONN
    return True


class BindMounts:
    """The daemon's own mount of each active snapshot and view, one directory per key."""

    def __init__(self, root: Path, directory: Path) -> None:
        self.root = root
        self.dir = directory
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._pool: WarmPool | None = None
        if mountclient.keep_alive("fusesnap"):
            # a Prepare after a quiet hour should not wait for a server to start again
            every = max(1.0, min(120.0, mountclient.idle_seconds() / 2))
            threading.Thread(target=self._keep_server, args=(every,), daemon=True).start()
        else:
            self._pool = WarmPool(root)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        # Mounts made here with mount(2) whose worker is still starting (key -> set when it
        # has reported): the kernel queues their requests meanwhile; Mounts waits for it.
        self._starting: dict[str, threading.Event] = {}
        self._direct = os.geteuid() == 0     # may mount FUSE itself; off after the first EPERM
        self._failed: set[str] = set()       # keys whose worker failed that way: mounted waiting next
        # a worker started ahead for the next mount made here (standby.py)
        self._standby = Standby(_shown(["--root", str(root), "mount", "(standby)"])) \
            if self._direct and self._pool is None else None

    def _keep_server(self, every: float) -> None:
        while not self._stop.wait(every):
            mountclient.keep_alive("fusesnap")

    def _mount(self, key: str, mountpoint: Path) -> tuple[int, str]:
        """Mount snapshot `key` at mountpoint: (exit code, what the mount command printed)."""
        if self._pool is None:
            got = _mount_by_server(self.root, key, mountpoint)
            if got is not None:
                return got
            with self._guard:        # the server cannot be used (gone, refused): processes then
                if self._pool is None:
                    log.warning("no mount server for this daemon; starting mount processes instead")
                    self._pool = WarmPool(self.root)
                    if self._standby is not None:    # (mounts made ahead need the server too)
                        self._standby.close()
        return self._pool.mount(key, mountpoint)

    def path(self, key: str) -> Path:
        return self.dir / hashlib.sha256(key.encode()).hexdigest()[:32]

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def ensure(self, sn: Snapshotter, info: Info) -> list[Mount]:
        """Mount `info` (active: rw, view: ro) unless it is mounted already; the bind to hand out."""
        mp = self.path(info.name)
        bind = [Mount(type="bind", source=str(mp), options=["rbind", "rw" if info.kind == "active" else "ro"])]
        with self._lock(info.name):
            starting = self._starting.get(info.name)
            if starting is not None:
                # Mounts of a snapshot whose worker is starting: its outcome first, so that a
                # worker that failed is replaced below (`ctr run` waits for it regardless: it
                # reads the image's /etc/group through the snapshot right after Prepare)
                starting.wait(OUTCOME_WAIT)
            try:
                mp.mkdir(mode=0o755)
                mounted = None              # a directory made just now has nothing on it
            except OSError as e:            # there already (ENOTCONN: a mount whose daemon is gone)
                if e.errno not in (errno.EEXIST, errno.ENOTCONN):
                    raise
                mounted = mountinfo.find(mp)
            if mounted is not None and not _alive(mp):
                log.warning("mount of snapshot %r lost its daemon; mounting it again", info.name)
                umount(mp)
                mounted = None
            if mounted is None and not self._mount_direct(sn, info, mp):
                rc, err = self._mount(info.name, mp)
                if rc != 0:
                    raise FusesnapError(f"mounting snapshot {info.name!r}: {_last_line(err, rc)}")
                self._failed.discard(info.name)
        return bind

    def _mount_direct(self, sn: Snapshotter, info: Info, mp: Path) -> bool:
        """Mount the snapshot's FUSE connection here with mount(2) (fuseconn) and hand it to a
        worker of the mount server, which serves it once started: the Prepare does not wait
        for that start (~10 ms); a Mounts call, or the first request on the mount, does.
        False (nothing mounted) where that cannot be done: then the caller mounts and waits."""
        if not self._direct or self._pool is not None or info.name in self._failed:
            return False
        plan = mount_plan(sn, info.name, options_for(info.name))
        if plan is None:
            return False        # the worker builds the chain's lower tree first, which may fail: wait
        sn.note_mount(info.name)    # (the worker would: it is of this process's namespaces)
        try:
            fd = fuseconn.mount(str(mp), planned_fuse_options(plan_options(plan), info.kind == "view"))
        except (OSError, ValueError) as e:
            if getattr(e, "errno", None) == errno.EPERM:
                self._direct = False
                if self._standby is not None:
                    self._standby.close()
            log.info("mounting snapshot %r with mount(2): %s; through the mount command instead", info.name, e)
            return False
        shown = _shown(_mount_argv(self.root, info.name, str(mp)))
        got = None
        try:
            if self._standby is not None:
                got = self._standby.hand_over([json.dumps(plan)], shown, fd)
            if got is not None:
                how = "its standby worker serves it"
                os.close(fd)     # it is in the message, in flight or with the worker already
                fd = -1
            else:
                how = "a worker of the mount server starts serving it"
                got = mountclient.submit_watched(PLANNED, [json.dumps(plan), "/dev/fd/0"], fd, shown)
        finally:
            if got is None:   # no server took it (or submitting failed): undo, mount the ordinary way
                os.close(fd)
                umount(mp, known_mounted=True)
        if got is None:
            return False
        sock, err_r = got
        done = threading.Event()
        self._starting[info.name] = done
        threading.Thread(target=self._follow, args=(info.name, sock, fd, err_r, done), daemon=True).start()
        log.debug("snapshot %r mounted with mount(2); %s", info.name, how)
        return True

    def _follow(self, key: str, sock: object, fd: int, err_r: int, done: threading.Event) -> None:
        """Wait for the worker serving a mount made by _mount_direct. The connection's descriptor
        here (fd; -1: given to a standby already) is closed as soon as the worker has its own:
        if the worker fails, the connection is then aborted (requests fail with ENOTCONN) and
        the next Mounts mounts it again."""
        held = [fd] if fd >= 0 else []

        def let_go() -> None:
            if held:
                os.close(held.pop())
        try:
            rc = mountclient.finish(sock, let_go, started=fd < 0)   # type: ignore[arg-type]
        finally:
            let_go()
        err = _written(err_r)
        with self._guard:
            mine = self._starting.get(key) is done
            if mine:
                del self._starting[key]
                if rc != 0:     # before done is set: a Mounts waiting on it must then mount and wait
                    self._failed.add(key)
        done.set()
        if rc != 0 and mine:            # (a released snapshot's worker just found its mount gone)
            why = "the mount server did not take it" if rc in (None, "retry") else _last_line(err, rc)
            log.warning("mounting snapshot %r: %s (its next Mounts mounts it again and waits)", key, why)

    def release(self, key: str) -> None:
        """Unmount the daemon's mount of `key` before its snapshot is committed or removed;
        refused while a bind of it (a running container) is still mounted."""
        mp = self.path(key)
        with self._lock(key):
            with self._guard:
                self._starting.pop(key, None)    # its worker, if still starting, finds the mount gone
                self._failed.discard(key)
            table = mountinfo.mounts()
            at = mountinfo.canonical(mp)
            mine = next((m for m in reversed(table) if m.mountpoint == at), None)
            if mine is not None:
                others = [m.mountpoint for m in table if m.device == mine.device and m.mount_id != mine.mount_id]
                if others:
                    raise InUse(f"snapshot {key!r} is still mounted at {os.fsdecode(others[0])}")
                umount(mp, known_mounted=True)
            try:
                mp.rmdir()
            except FileNotFoundError:
                pass
        with self._guard:
            self._locks.pop(key, None)

    def close(self) -> None:
        self._stop.set()            # the server then goes after its idle time
        if self._standby is not None:
            self._standby.close()
        if self._pool is not None:
            self._pool.close()

    def recover(self, sn: Snapshotter) -> int:
        """Mount again every snapshot whose mount directory survived but whose mount did not,
        or whose mount lost its daemon (a daemon killed while a mount's worker started)."""
        n = 0
        for info in sn.list():
            if info.kind not in ("active", "view"):
                continue
            mp = self.path(info.name)
            try:
                if not mp.is_dir():
                    continue
            except OSError:             # ENOTCONN: mounted, daemon gone
                pass
            if mountinfo.find(mp) is not None and _alive(mp):
                continue
            try:
                self.ensure(sn, info)
                n += 1
            except FusesnapError as e:
                log.warning("%s", e)
        return n
