"""`fusesnap serve` whose containers get kernel overlay mounts: what the proxy costs by itself.

A reference for `bench.py --containerd`, not a mode of fusesnap. The daemon
does for containerd what the real one does: the same gRPC server, the durable
Prepare, Stat, Mounts, Remove, Cleanup, and FUSE mounts for the snapshots
containerd unpacks layers into. Only a container's snapshot is answered with
a kernel overlay of the store's layer directories instead of a FUSE union, so
containerd mounts and unmounts it as it does its own overlayfs snapshots. That
view is not what fusesnap would present (whiteouts stay the stored files,
modes are the host's), which `ctr run IMG true` does not notice.

fusesnap's `ctr run` minus this row is what the FUSE mount costs (its daemon's
start, its requests, containerd's `fusermount3` at each unmount); this row minus
containerd's overlayfs is what being a proxy snapshotter in Python costs.

Run as `python proxyfloor.py <fusesnap arguments>`.
"""

from __future__ import annotations

import sys

from fusesnap.cli.main import main
from fusesnap.daemon import convert, service, unpack
from fusesnap.snapshots.snapshotter import Mount, Snapshotter

_create = service.SnapshotsService._create
_mounts = service.SnapshotsService._mounts


def _container(sn: Snapshotter, key: str) -> bool:
    return not unpack.mount_options(key) and sn.stat(key).kind == "active"


def _overlay(sn: Snapshotter, key: str) -> list[Mount]:
    lowers = [str(sn.store.fs_dir(c)) for c in reversed(sn.chain_of(key))]
    opts = ["index=off", f"workdir={sn.work_dir(key)}", f"upperdir={sn.upper_dir(key)}"]
    if lowers:
        opts.insert(0, "lowerdir=" + ":".join(lowers))
    return [Mount(type="overlay", source="overlay", options=opts)]


def _create_floor(self: service.SnapshotsService, kind: str, request: object) -> list:
    key = request.key    # type: ignore[attr-defined]
    if kind != "active" or unpack.mount_options(key):
        return _create(self, kind, request)
    sn = self._sn()
    sn.create("active", key, request.parent, dict(request.labels))    # type: ignore[attr-defined]
    return convert.mounts_to_pb(_overlay(sn, key))


def _mounts_floor(self: service.SnapshotsService, key: str) -> list:
    sn = self._sn()
    return _overlay(sn, key) if _container(sn, key) else _mounts(self, key)


def install() -> None:
    """Answer containers' snapshots with overlay mounts in this process's daemon."""
    service.SnapshotsService._create = _create_floor        # type: ignore[method-assign]
    service.SnapshotsService._mounts = _mounts_floor        # type: ignore[method-assign]


if __name__ == "__main__":
    install()
    sys.exit(main(sys.argv[1:]))
