"""Mounting snapshots through the FUSE filesystem: lower tree from the cache, upper from the snapshot.

A snapshot's daemon holds a flock on `mounts/<snapshot id>.lock` in the store
root for as long as it serves (exclusive for an active snapshot: two daemons
must never share an upper; shared for a view), so commit and remove can tell a
live mount from none in whatever mount namespace it was made (`unshare -m`, a
container's): they hold the lock exclusively while they work. Each mount is
also tagged with the FUSE fsname `fusesnap:<store tag>:<snapshot id>`, which
says where it is mounted.

The FUSE layer (fs.fuse.mount, fs.options) and the recorder are imported inside
the functions that mount: commands that only check or release a mount (commit,
remove, the gRPC daemon) never load them, and a mount forks its daemon before
they are imported (fs/fuse/mount.py says why).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from ..crashpoints import crash_point
from ..errors import FusesnapError, InUse, InvalidInput
from ..linux import flock, fuseconn, libc, mountinfo
from ..linux.mountinfo import is_mountpoint

if TYPE_CHECKING:
    from ..fs.fuse.mount import PendingDaemon
    from ..fs.options import MountOptions
    from .snapshotter import Snapshotter

log = logging.getLogger(__name__)


def store_tag(root: Path) -> str:
    return hashlib.sha256(os.fsencode(os.path.realpath(root))).hexdigest()[:12]


def fsname_for(sn: "Snapshotter", sid: int) -> str:
    return f"fusesnap:{store_tag(sn.root)}:{sid}"


def mount_table(path: str = mountinfo.SELF) -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) of every mount in a mountinfo file (default: this process's)."""
    return [(os.fsdecode(m.mountpoint), m.fstype, os.fsdecode(m.source)) for m in mountinfo.mounts(path)]


def mounts_of(sn: "Snapshotter", sid: int, table: str = mountinfo.SELF) -> list[str]:
    """Mount points where snapshot `sid` of this store is mounted (in this process's mount table)."""
    name = fsname_for(sn, sid)
    return [mp for mp, fstype, src in mount_table(table) if fstype.startswith("fuse") and src == name]


def lock_path(sn: "Snapshotter", sid: int) -> Path:
    """The file snapshot `sid`'s daemon holds a flock on while it serves."""
    d = sn.root / "mounts"
    d.mkdir(mode=0o700, exist_ok=True)
    return d / f"{sid}.lock"


def _where(sn: "Snapshotter", sid: int, holders: list[int]) -> str:
    """Where the daemons holding the lock mounted the snapshot, as well as we can tell."""
    own_ns = _mount_ns("self")
    for pid in holders:
        try:
            mps = mounts_of(sn, sid, f"/proc/{pid}/mountinfo")
        except OSError:
            continue
        if mps:
            other = "" if _mount_ns(str(pid)) == own_ns else " in another mount namespace"
            return f"at {mps[0]}{other} (daemon pid {pid})"
    return f"(daemon pid {holders[0]})" if holders else "(by a live daemon)"


def _mount_ns(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


# How long a lock held by a daemon whose mount this process cannot see may take to go:
# a daemon lets go as its request loop ends, milliseconds after its mount went away
# (longer on a loaded machine).
_EXIT_GRACE = 5.0


@contextmanager
def not_mounted(sn: "Snapshotter", sid: int, key: str, action: str) -> Iterator[None]:
    """Hold off every daemon of snapshot `sid` for the body; InUse if one serves it now,
    in any mount namespace."""
    def refuse(where: str) -> InUse:
        return InUse(f"cannot {action} snapshot {key!r}: it is mounted {where} (unmount it first)")

    path = lock_path(sn, sid)
    fd = flock.hold(path)
    deadline = time.monotonic() + _EXIT_GRACE
    pause = 0.0002   # a daemon just unmounted lets its lock go within a millisecond or two
    while fd is None:
        mps = mounts_of(sn, sid)
        if mps:
            raise refuse(f"at {mps[0]}")
        if time.monotonic() > deadline:   # mounted where this process cannot see it
            raise refuse(_where(sn, sid, flock.holders(path)))
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
        fd = flock.hold(path)
    try:
        mps = mounts_of(sn, sid)   # a daemon of a fusesnap that took no lock
        if mps:
            raise refuse(f"at {mps[0]}")
        yield
    finally:
        os.close(fd)


def check_not_mounted(sn: "Snapshotter", sid: int, key: str, action: str) -> None:
    """InUse if snapshot `sid` is mounted now (in any mount namespace)."""
    with not_mounted(sn, sid, key, action):
        pass


def daemon_lock(sn: "Snapshotter", sid: int, key: str, active: bool) -> tuple[str, bool, str]:
    """The lock a daemon of snapshot `sid` holds (fs.fuse.mount.Lock): exclusive for an
    active snapshot, shared for a view."""
    busy = (f"snapshot {key!r} is in use: mounted by another daemon, or being committed or removed"
            if active else f"snapshot {key!r} is being removed")
    return (str(lock_path(sn, sid)), not active, busy)


# Options of `mount -t fuse3.fusesnap` that describe the snapshot rather than the FUSE mount.
SNAPSHOT_OPTS = ("root", "snapshot", "upperdir", "workdir", "chain")
# Generic mount(8) options mount.fuse3 passes along; meaningless for the daemon.
GENERIC_OPTS = {"rw", "ro", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail"}


def split_mount_options(items: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """A fuse3.fusesnap mount's options (items may be comma lists): (the snapshot's, by
    name; the mount's own, generic mount(8) options left out)."""
    kv: dict[str, str] = {}
    own: list[str] = []
    for text in items:
        for item in text.split(","):
            key, sep, val = item.partition("=")
            if key in SNAPSHOT_OPTS and sep:
                kv[key] = val
            elif item and item not in GENERIC_OPTS:
                own.append(item)
    return kv, own


def container_options() -> list[str]:
    """Mount options for a snapshot a container runtime uses: its containers may run
    as users other than the mount's owner, so root asks for allow_other (a plain user
    cannot without user_allow_other; root of a user namespace has it by default)."""
    return ["allow_other"] if os.geteuid() == 0 else []


def mount_snapshot(sn: "Snapshotter", key: str, mountpoint: str | os.PathLike, *, foreground: bool = False,
                   options: Iterable[str] = (), daemon: "PendingDaemon | None" = None) -> int:
    """Mount active `key` read-write or view `key` read-only at mountpoint.

    Returns once the mount is live (the daemon runs on in the background) or,
    with foreground=True, once it has been unmounted again. With `daemon` (from
    fs.mount.spawn_daemon(), forked before the store was opened) that daemon
    loads the chain's cached lower tree itself and mounts; it is cancelled if
    anything fails here first.
    """
    plan, parent_chain, sid = _plan(sn, key, options)
    conn, mountpoint = _mount_target(mountpoint)
    if plan["kind"] == "active" and conn is None:   # (a connection is in the mount table already)
        check_not_mounted(sn, sid, key, "mount")  # fail early; the daemon's lock decides
    opts = plan_options(plan)
    if opts.record:     # --record / -o record=FILE: the log names the chain's layers
        from .recorder import record_layers

        opts.record_layers = record_layers(sn.store, parent_chain)
    if daemon is not None and not foreground:
        from ..fs.fuse.mount import TreeUnavailable, serving_here

        # a daemon forked before the connection was set aside above does not have it
        spec = _tree_spec(sn, parent_chain) if conn is None or serving_here() else None
        if spec is not None:
            try:
                return daemon.start(spec, plan.get("upper"), plan.get("work"), Path(mountpoint), opts,
                                    plan["lock"])
            except TreeUnavailable as e:   # e.g. the cache file went bad: rebuild it here
                log.info("mounting %s: cached lower tree unusable (%s); rebuilding it", key, e)
        daemon.cancel()
    from ..fs.fuse.mount import mount

    tree = sn.trees.get(parent_chain)
    # fs.mount double-forks: the daemon is init's child, no zombie is left to reap here
    return mount(tree, plan.get("upper"), plan.get("work"), Path(mountpoint), opts, foreground, plan["lock"])


def mount_plan(sn: "Snapshotter", key: str, options: Iterable[str] = ()) -> dict | None:
    """All that mounting `key` reads from the store, for mount_planned() in a process that
    then need not open the store (a mount server worker's start is on the path of a
    container's first file access); None when the mount needs the store itself (the
    chain's lower tree is not cached yet, or it records accesses)."""
    plan, parent_chain, _ = _plan(sn, key, options)
    plan["tree"] = ("empty",)
    if parent_chain:
        path = sn.trees.path(parent_chain)
        if not path.exists():
            return None
        plan["tree"] = ("cache", str(path))
    if plan_options(plan).record:
        return None
    return plan


def _plan(sn: "Snapshotter", key: str, options: Iterable[str]) -> tuple[dict, str | None, int]:
    """(what a mount of `key` needs to know, its parent chain, its snapshot id)."""
    rec = sn.db.get(key)
    if rec is None or rec.kind == "committed":
        sn.stat(key)            # NotFound where there is no snapshot at all (not even a store layer)
        raise InvalidInput(f"snapshot {key!r} is committed: mount a view or an active snapshot of it")
    plan = {"root": str(sn.root), "key": key, "kind": rec.kind, "fsname": fsname_for(sn, rec.id),
            "options": list(options), "lock": daemon_lock(sn, rec.id, key, rec.kind == "active")}
    if rec.kind == "active":
        d = sn.snapshot_dir(rec.id)
        plan["upper"], plan["work"] = str(d / "upper"), str(d / "work")
    return plan, rec.parent_chain, rec.id


def mount_planned(plan: dict, mountpoint: str, daemon: "PendingDaemon") -> int:
    """Mount what mount_plan() described at a connection mounted already (/dev/fd/N), as
    mount_snapshot() would; a cached tree that turns out unusable is rebuilt from the
    store as there."""
    from ..fs.fuse.mount import TreeUnavailable

    conn, mountpoint = _mount_target(mountpoint)
    if conn is None:
        raise InvalidInput(f"{mountpoint}: a planned mount takes a FUSE connection (/dev/fd/N)")
    try:
        return daemon.start(tuple(plan["tree"]), plan.get("upper"), plan.get("work"), Path(mountpoint),
                            plan_options(plan), tuple(plan["lock"]))
    except TreeUnavailable as e:
        log.info("mounting %s: cached lower tree unusable (%s); rebuilding it", plan["key"], e)
    from .snapshotter import Snapshotter

    with Snapshotter(plan["root"]) as sn:
        return mount_snapshot(sn, plan["key"], mountpoint, options=plan["options"], daemon=daemon)


def _mount_target(mountpoint: str | os.PathLike) -> tuple[int | None, str]:
    """(the connection, where to mount): a connection mounted already (libfuse's /dev/fd/N)
    is kept clear of stdin/stdout/stderr, which the daemon points at /dev/null once it is live."""
    conn = fuseconn.connection_fd(mountpoint)
    if conn is None:
        if not Path(mountpoint).is_dir():
            raise InvalidInput(f"mount point {os.fspath(mountpoint)!r} is not a directory")
        return None, os.fspath(mountpoint)
    if not fuseconn.is_connection(conn):
        raise InvalidInput(f"{os.fspath(mountpoint)} is not an open FUSE connection (/dev/fuse)")
    if conn < 3:
        conn = fcntl.fcntl(conn, fcntl.F_DUPFD_CLOEXEC, 3)
    crash_point("connection-taken")
    return conn, f"/dev/fd/{conn}"


def plan_options(plan: dict) -> "MountOptions":
    """The mount options a plan (_plan) stands for."""
    from ..fs.options import parse_options

    opts = parse_options(list(plan["options"]))
    opts.fsname = plan["fsname"]
    if plan["kind"] == "active":
        opts.upperdir, opts.workdir = plan["upper"], plan["work"]
    else:
        opts.read_only = True
    return opts


def _tree_spec(sn: "Snapshotter", chain: str | None) -> tuple | None:
    """How a pending daemon gets the chain's merged lower tree: from the cache file
    (built and saved here first if missing), None if it cannot be cached."""
    if not chain:
        return ("empty",)
    path = sn.trees.path(chain)
    if not path.exists():
        _build_tree_cache(sn, chain)
        if not path.exists():
            return None
    return ("cache", str(path))


def _build_tree_cache(sn: "Snapshotter", chain: str) -> None:
    """Build and save the chain's lower tree (a failed save only logs). A process that
    will serve the mount itself (a mount server's worker) builds it in a child: the
    build holds ~250 bytes an entry, and memory a process has freed mostly stays with
    it, so the daemon would keep that for its life instead of the packed tree's ~70."""
    from ..fs.fuse.mount import serving_here

    if not serving_here():
        sn.trees.get(chain)
        return
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with sn.reopen() as own:     # its own database connections: none cross the fork
                own.trees.get(chain)
            code = 0
        finally:
            os._exit(code)
    os.waitpid(pid, 0)


def umount(mountpoint: str | os.PathLike, timeout: float = 30.0, known_mounted: bool = False) -> None:
    """Unmount a FUSE mount and wait until it is gone from the mount table
    (known_mounted: the caller has just seen it in the table)."""
    mp = os.path.realpath(mountpoint)
    if not known_mounted and not is_mountpoint(mp):
        raise InvalidInput(f"{mp} is not a mount point")
    errors = []
    if os.geteuid() == 0:
        try:
            libc.umount2(mp)    # no helper program to start (~5 ms); not lazy: gone when it returns
            return
        except OSError as e:
            errors.append(f"umount2: {e.strerror}")
    import subprocess   # ~9 ms of imports (selectors, threading...) a mount's start-up never needs

    cmds = [["fusermount3", "-u", mp]] + ([["umount", mp]] if os.geteuid() == 0 else [])
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
