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

The mount daemons are separate processes: they outlive a restart of
`fusesnap serve`, which finds them in the mount table again; a mount that is
gone (a reboot, a killed mount daemon) is made again on the next Mounts call,
or at start-up for every snapshot whose mount directory is still there.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterable

from ..errors import FusesnapError, InUse
from ..linux import mountinfo
from ..snapshots.mounting import umount
from ..snapshots.snapshotter import Info, Mount

log = logging.getLogger(__name__)


def fusesnap_program() -> list[str]:
    """The `fusesnap` console script of this installation (its fast mount path), else `python -m fusesnap`."""
    script = Path(sys.executable).parent / "fusesnap"
    if script.exists():
        return [str(script)]
    found = shutil.which("fusesnap")
    return [found] if found else [sys.executable, "-m", "fusesnap"]


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
        self._program = fusesnap_program()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def path(self, key: str) -> Path:
        return self.dir / hashlib.sha256(key.encode()).hexdigest()[:32]

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def ensure(self, info: Info) -> list[Mount]:
        """Mount `info` (active: rw, view: ro) unless it is mounted already; the bind to hand out."""
        mp = self.path(info.name)
        with self._lock(info.name):
            if mountinfo.find(mp) is not None and not _alive(mp):
                log.warning("mount of snapshot %r lost its daemon; mounting it again", info.name)
                umount(mp)
            if mountinfo.find(mp) is None:
                mp.mkdir(mode=0o755, exist_ok=True)
                r = subprocess.run([*self._program, "--root", str(self.root), "mount", info.name, str(mp)],
                                   stdin=subprocess.DEVNULL, capture_output=True, text=True)
                if r.returncode != 0:
                    why = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
                    raise FusesnapError(f"mounting snapshot {info.name!r}: {why}")
        return [Mount(type="bind", source=str(mp), options=["rbind", "rw" if info.kind == "active" else "ro"])]

    def release(self, key: str) -> None:
        """Unmount the daemon's mount of `key` before its snapshot is committed or removed;
        refused while a bind of it (a running container) is still mounted."""
        mp = self.path(key)
        with self._lock(key):
            mine = mountinfo.find(mp)
            if mine is not None:
                others = [m.mountpoint for m in mountinfo.mounts()
                          if m.device == mine.device and m.mount_id != mine.mount_id]
                if others:
                    raise InUse(f"snapshot {key!r} is still mounted at {os.fsdecode(others[0])}")
                umount(mp)
            try:
                mp.rmdir()
            except FileNotFoundError:
                pass
        with self._guard:
            self._locks.pop(key, None)

    def recover(self, infos: Iterable[Info]) -> int:
        """Mount again every snapshot whose mount directory survived but whose mount did not."""
        n = 0
        for info in infos:
            if info.kind in ("active", "view") and self.path(info.name).is_dir() \
                    and mountinfo.find(self.path(info.name)) is None:
                try:
                    self.ensure(info)
                    n += 1
                except FusesnapError as e:
                    log.warning("%s", e)
        return n
