"""Mounting snapshots through the FUSE filesystem: lower tree from the cache, upper from the snapshot.

Each mount is tagged with the FUSE fsname `fusesnap:<store tag>:<snapshot id>`
so the snapshotter can tell, from /proc/self/mountinfo alone, whether a
snapshot is mounted (commit and remove refuse to pull an upper out from under
a live mount).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ..errors import FusesnapError, InUse, InvalidInput
from ..linux import mountinfo
from ..linux.mountinfo import is_mountpoint

if TYPE_CHECKING:
    from ..fs.fuse.mount import PendingDaemon
    from .snapshotter import Mount, Snapshotter

log = logging.getLogger(__name__)


def store_tag(root: Path) -> str:
    return hashlib.sha256(os.fsencode(os.path.realpath(root))).hexdigest()[:12]


def fsname_for(sn: "Snapshotter", sid: int) -> str:
    return f"fusesnap:{store_tag(sn.root)}:{sid}"


def mount_table() -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) of every mount this process can see."""
    return [(os.fsdecode(m.mountpoint), m.fstype, os.fsdecode(m.source)) for m in mountinfo.mounts()]



def mounts_of(sn: "Snapshotter", sid: int) -> list[str]:
    """Mount points where snapshot `sid` of this store is mounted."""
    name = fsname_for(sn, sid)
    return [mp for mp, fstype, src in mount_table() if fstype.startswith("fuse") and src == name]


def check_not_mounted(sn: "Snapshotter", sid: int, key: str, action: str) -> None:
    mps = mounts_of(sn, sid)
    if mps:
        raise InUse(f"cannot {action} snapshot {key!r}: it is mounted at {mps[0]} (unmount it first)")


def mount_snapshot(sn: "Snapshotter", key: str, mountpoint: str | os.PathLike, *, foreground: bool = False,
                   options: Iterable[str] = (), daemon: "PendingDaemon | None" = None) -> int:
    """Mount active `key` read-write or view `key` read-only at mountpoint.

    Returns once the mount is live (the daemon runs on in the background) or,
    with foreground=True, once it has been unmounted again. With `daemon` (from
    fs.mount.spawn_daemon(), forked before the store was opened) that daemon
    loads the chain's cached lower tree itself and mounts; it is cancelled if
    anything fails here first.
    """
    from ..fs.options import parse_options

    info = sn.stat(key)
    if info.kind == "committed":
        raise InvalidInput(f"snapshot {key!r} is committed: mount a view or an active snapshot of it")
    mp = Path(mountpoint)
    if not mp.is_dir():
        raise InvalidInput(f"mount point {str(mp)!r} is not a directory")
    rec = sn._record(key)
    opts = parse_options(list(options))
    opts.fsname = fsname_for(sn, rec.id)
    upper = work = None
    if info.kind == "active":
        check_not_mounted(sn, rec.id, key, "mount")  # two daemons must never share an upper
        d = sn.snapshot_dir(rec.id)
        upper, work = d / "upper", d / "work"
        opts.upperdir, opts.workdir = str(upper), str(work)
    else:
        opts.read_only = True
    if opts.record:     # --record / -o record=FILE: the log names the chain's layers
        from .recorder import record_layers

        opts.record_layers = record_layers(sn.store, rec.parent_chain)
    if daemon is not None and not foreground:
        from ..fs.fuse.mount import TreeUnavailable

        spec = _tree_spec(sn, rec.parent_chain)
        if spec is not None:
            try:
                return daemon.start(spec, upper, work, mp, opts)
            except TreeUnavailable as e:   # e.g. the cache file went bad: rebuild it here
                log.info("mounting %s: cached lower tree unusable (%s); rebuilding it", key, e)
        daemon.cancel()
    from ..fs.fuse.mount import mount

    tree = sn.trees.get(rec.parent_chain)
    # fs.mount double-forks: the daemon is init's child, no zombie is left to reap here
    return mount(tree, upper, work, mp, opts, foreground)


def _tree_spec(sn: "Snapshotter", chain: str | None) -> tuple | None:
    """How a pending daemon gets the chain's merged lower tree: from the cache file
    (built and saved here first if missing), None if it cannot be cached."""
    if not chain:
        return ("empty",)
    path = sn.trees.path(chain)
    if not path.exists():
        sn.trees.get(chain)          # builds and saves it (a failed save only logs)
        if not path.exists():
            return None
    return ("cache", str(path))


def umount(mountpoint: str | os.PathLike, timeout: float = 30.0) -> None:
    """Unmount a FUSE mount and wait until it is gone from the mount table."""
    import subprocess

    mp = os.path.realpath(mountpoint)
    if not is_mountpoint(mp):
        raise InvalidInput(f"{mp} is not a mount point")
    cmds = [["fusermount3", "-u", mp]]
    if os.geteuid() == 0:
        cmds.append(["umount", mp])
    errors = []
    for cmd in cmds:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError as e:
            errors.append(str(e))
            continue
        if r.returncode == 0 or not is_mountpoint(mp):
            break
        errors.append(r.stderr.strip() or f"{cmd[0]} exited {r.returncode}")
    deadline = time.monotonic() + timeout
    while is_mountpoint(mp):
        if time.monotonic() > deadline:
            raise FusesnapError(f"could not unmount {mp}: {'; '.join(errors) or 'still mounted'}")
        time.sleep(0.01)


def mount_all(mounts: Iterable["Mount"], target: str | os.PathLike) -> None:
    """Perform mounts as returned by Snapshotter.mounts() (containerd's mount.All)."""
    from .snapshotter import Snapshotter

    for m in mounts:
        if m.type != "fuse3.fusesnap":
            raise InvalidInput(f"unsupported mount type {m.type!r}")
        kv = dict(o.partition("=")[::2] for o in m.options)
        root, key = kv.get("root"), kv.get("snapshot")
        if not root or not key:
            raise InvalidInput("fusesnap mount lacks root= or snapshot= options")
        with Snapshotter(root) as sn:
            rc = mount_snapshot(sn, key, target)
        if rc != 0:
            raise FusesnapError(f"mounting snapshot {key!r} at {target} failed (exit {rc})")
