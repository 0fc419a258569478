"""A client of `fusesnap serve` with the Snapshotter's method names and types.

What containerd's proxy snapshotter does, in Python: the conformance suite
runs through it against a live daemon, and the benchmarks time it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, TypeVar

import grpc

from ..snapshots.snapshotter import Info, Mount, Usage, mount_all
from . import convert
from .errmap import error_of
from .pb import snapshots_pb2 as pb, snapshots_pb2_grpc as pb_grpc

T = TypeVar("T")
SNAPSHOTTER = "fusesnap"      # the proxy plugin's name, sent in every request as containerd does


class RemoteSnapshotter:
    """Talks to the daemon at a unix socket; failures raise the same fusesnap errors as in-process."""

    def __init__(self, address: str | Path, timeout: float = 120.0) -> None:
        self.address = str(address)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix:{self.address}")
        self._stub = pb_grpc.SnapshotsStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "RemoteSnapshotter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float) -> None:
        """Block until the daemon accepts calls (it creates the socket before it serves)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def _rpc(self, fn: Callable[..., T], request: object) -> T:
        try:
            return fn(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise error_of(e.code(), e.details() or str(e.code())) from None

    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        r = self._rpc(self._stub.Prepare, pb.PrepareSnapshotRequest(
            snapshotter=SNAPSHOTTER, key=key, parent=parent, labels=labels or {}))
        return convert.mounts_from_pb(r.mounts)

    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        r = self._rpc(self._stub.View, pb.ViewSnapshotRequest(
            snapshotter=SNAPSHOTTER, key=key, parent=parent, labels=labels or {}))
        return convert.mounts_from_pb(r.mounts)

    def mounts(self, key: str) -> list[Mount]:
        r = self._rpc(self._stub.Mounts, pb.MountsRequest(snapshotter=SNAPSHOTTER, key=key))
        return convert.mounts_from_pb(r.mounts)

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> Info:
        self._rpc(self._stub.Commit, pb.CommitSnapshotRequest(
            snapshotter=SNAPSHOTTER, name=name, key=key, labels=labels or {}))
        return self.stat(name)

    def remove(self, key: str) -> None:
        self._rpc(self._stub.Remove, pb.RemoveSnapshotRequest(snapshotter=SNAPSHOTTER, key=key))

    def stat(self, key: str) -> Info:
        r = self._rpc(self._stub.Stat, pb.StatSnapshotRequest(snapshotter=SNAPSHOTTER, key=key))
        return convert.info_from_pb(r.info)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        req = pb.UpdateSnapshotRequest(snapshotter=SNAPSHOTTER, info=convert.info_to_pb(info))
        req.update_mask.paths.extend(fieldpaths)
        return convert.info_from_pb(self._rpc(self._stub.Update, req).info)

    def list(self, *filters: str) -> list[Info]:
        def collect(req: pb.ListSnapshotsRequest, timeout: float) -> list[Info]:
            return [convert.info_from_pb(i) for batch in self._stub.List(req, timeout=timeout) for i in batch.info]
        return self._rpc(collect, pb.ListSnapshotsRequest(snapshotter=SNAPSHOTTER, filters=list(filters)))

    def walk(self, fn: Callable[[Info], None], *filters: str) -> None:
        for info in self.list(*filters):
            fn(info)

    def usage(self, key: str) -> Usage:
        r = self._rpc(self._stub.Usage, pb.UsageRequest(snapshotter=SNAPSHOTTER, key=key))
        return Usage(r.size, r.inodes)

    def cleanup(self) -> None:
        self._rpc(self._stub.Cleanup, pb.CleanupRequest(snapshotter=SNAPSHOTTER))


def perform(mounts: list[Mount], target: str | Path) -> None:
    """Mount what Prepare/View/Mounts returned at target, as containerd does: a `bind` of the
    daemon's own mount (one mount(2); needs root, like containerd), or `fuse3.fusesnap`."""
    for m in mounts:
        if m.type == "bind":
            subprocess.run(["mount", "--rbind", m.source, str(target)], check=True, capture_output=True)
            if "ro" in m.options:
                subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True, capture_output=True)
        else:
            mount_all([m], target)
