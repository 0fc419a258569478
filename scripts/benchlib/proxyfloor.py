"""`fusesnap serve` whose containers get other mounts than fusesnap's: references for the bench.

Not a mode of fusesnap. The daemon does for containerd what the real one does:
the same gRPC server, the durable Prepare, Stat, Mounts, Remove, Cleanup, and
fusesnap's FUSE mounts for the snapshots containerd unpacks layers into. Only a
container's snapshot is mounted another way, over the store's layer
directories:

- `overlay`: a kernel overlay, which containerd mounts and unmounts as its own
  overlayfs snapshots. fusesnap's `ctr run` minus this row is what its FUSE
  mount costs (its daemon's start, its requests, containerd's `fusermount3` at
  each unmount); this row minus containerd's overlayfs is what being a proxy
  snapshotter in Python costs. The view is not what fusesnap would present
  (whiteouts stay stored files, modes are the host's), which `ctr run IMG true`
  does not notice.
- `fuse-overlayfs`: the daemon starts a fuse-overlayfs (C, one per container,
  as fusesnap starts a worker) at Prepare and hands out a bind of it, as
  fusesnap's bind mode does: what a per-container FUSE daemon that starts in a
  few milliseconds and answers in microseconds would reach behind this proxy.

Run as `python proxyfloor.py {overlay|fuse-overlayfs} <fusesnap arguments>`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

from fusesnap.cli.main import main
from fusesnap.daemon import convert, service, unpack
from fusesnap.snapshots.snapshotter import Mount, Snapshotter

_create = service.SnapshotsService._create
_mounts = service.SnapshotsService._mounts

Mounter = Callable[[service.SnapshotsService, Snapshotter, str], list[Mount]]


def _container(sn: Snapshotter, key: str) -> bool:
    return not unpack.is_unpack_key(key) and sn.stat(key).kind == "active"


def _overlay_options(sn: Snapshotter, key: str) -> list[str]:
    lowers = [str(sn.store.fs_dir(c)) for c in reversed(sn.chain_of(key))]
    opts = [f"workdir={sn.work_dir(key)}", f"upperdir={sn.upper_dir(key)}"]
    if lowers:
        opts.insert(0, "lowerdir=" + ":".join(lowers))
    return opts


def overlay(svc: service.SnapshotsService, sn: Snapshotter, key: str) -> list[Mount]:
    return [Mount(type="overlay", source="overlay", options=["index=off", *_overlay_options(sn, key)])]


def fuse_overlayfs(svc: service.SnapshotsService, sn: Snapshotter, key: str) -> list[Mount]:
    """fuse-overlayfs mounted where the daemon's own mount of `key` goes; Commit and Remove
    unmount it there as they would fusesnap's."""
    if svc.binds is None:
        raise RuntimeError("the fuse-overlayfs reference needs bind mounts (serve --mounts bind)")
    mp = svc.binds.path(key)
    if not os.path.ismount(mp):
        mp.mkdir(mode=0o755, exist_ok=True)
        subprocess.run(["fuse-overlayfs", "-o", ",".join(_overlay_options(sn, key)), str(mp)], check=True)
    return [Mount(type="bind", source=str(mp), options=["rbind", "rw"])]


MOUNTERS: dict[str, Mounter] = {"overlay": overlay, "fuse-overlayfs": fuse_overlayfs}


def install(mounter: Mounter) -> None:
    """Mount containers' snapshots with `mounter` in this process's daemon."""
    def create(self: service.SnapshotsService, kind: str, request: object) -> list:
        key = request.key    # type: ignore[attr-defined]
        if kind != "active" or unpack.is_unpack_key(key):
            return _create(self, kind, request)
        sn = self._sn()
        sn.create("active", key, request.parent, dict(request.labels))    # type: ignore[attr-defined]
        return convert.mounts_to_pb(mounter(self, sn, key))

    def mounts(self: service.SnapshotsService, key: str) -> list:
        sn = self._sn()
        return mounter(self, sn, key) if _container(sn, key) else _mounts(self, key)

    service.SnapshotsService._create = create       # type: ignore[method-assign]
    service.SnapshotsService._mounts = mounts       # type: ignore[method-assign]


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in MOUNTERS:
        sys.exit(f"usage: proxyfloor.py {{{'|'.join(MOUNTERS)}}} <fusesnap arguments>")
    install(MOUNTERS[sys.argv[1]])
    sys.exit(main(sys.argv[2:]))
