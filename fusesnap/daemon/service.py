"""The Snapshots servicer: containerd's RPCs on the store's Snapshotter.

gRPC runs each call on a pool thread; every thread gets its own Snapshotter
(its own SQLite connections), so calls run side by side the way separate
`fusesnap` processes do, with the store's locks and transactions keeping
them apart.

Remote snapshots: when containerd's unpacker prepares a layer it may label
the request `containerd.io/snapshot.ref` = the chainID it is about to build.
A commit keeps that label from its active snapshot, so if a committed
snapshot with that label already sits on the same parent, Prepare answers
AlreadyExists and containerd adopts that snapshot (it finds it by listing
with the label) instead of extracting the layer again.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import grpc
from google.protobuf.empty_pb2 import Empty

from ..errors import AlreadyExists, InvalidInput
from ..snapshots.snapshotter import Info, Snapshotter
from . import convert, unpack
from .bindmounts import BindMounts
from .errmap import status_of
from .pb import snapshots_pb2 as pb, snapshots_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

REF_LABEL = "containerd.io/snapshot.ref"
MAX_LABEL_SIZE = 4096          # containerd's labels.Validate: len(key) + len(value)
LIST_BATCH = 100               # infos per List message, as containerd's own server sends

T = TypeVar("T")


def check_labels(labels: dict[str, str]) -> None:
    for k, v in labels.items():
        if not k:
            raise InvalidInput("label key must not be empty")
        if len(k) + len(v) > MAX_LABEL_SIZE:
            raise InvalidInput(f"label {k[:64]!r}: key and value exceed {MAX_LABEL_SIZE} bytes")


class SnapshotsService(pb_grpc.SnapshotsServicer):
    """containerd.services.snapshots.v1.Snapshots over the store at `root`."""

    def __init__(self, root: Path, binds: BindMounts | None = None) -> None:
        self.root = Path(root)
        self.binds = binds
        os.makedirs(self.root, mode=0o700, exist_ok=True)   # a new store is its owner's alone
        self._local = threading.local()
        self._all: list[Snapshotter] = []
        self._lock = threading.Lock()
        # Removed snapshots' directories, deleted after the Remove returned (containerd waits
        # for each Remove of `ctr run --rm`); None stops the thread. A crash leaves their
        # intents, which the start-up cleanup finishes.
        self._doomed: queue.Queue[tuple[Path, int] | None] = queue.Queue()
        self._deleter = threading.Thread(target=self._delete_doomed, name="deleter", daemon=True)
        self._deleter.start()
        removed = self._cleanup()   # opens (creates) the store now: a bad root fails at start
        if removed:
            log.warning("removed %d leftovers of interrupted work", len(removed))
        if binds is not None:
            n = binds.recover(self._sn())
            if n:
                log.warning("mounted %d snapshots again whose mounts were gone", n)

    def _sn(self) -> Snapshotter:
        sn = getattr(self._local, "sn", None)
        if sn is None:
            sn = Snapshotter(self.root)
            self._local.sn = sn
            with self._lock:
                self._all.append(sn)
        return sn

    def _delete_doomed(self) -> None:
        while (job := self._doomed.get()) is not None:
            try:
                self._sn().delete_given_up(*job)
            except Exception as e:   # noqa: BLE001 -- the intent stays: Cleanup tries again
                log.warning("deleting %s: %s", job[0], e)

    def close(self) -> None:
        """Close every thread's Snapshotter (after the server stopped calling in)."""
        self._doomed.put(None)
        self._deleter.join()
        with self._lock:
            for sn in self._all:
                sn.close()
            self._all.clear()
        if self.binds is not None:
            self.binds.close()

    # -- helpers --------------------------------------------------------------------
    def _cleanup(self) -> list[str]:
        """What a killed daemon (or an interrupted import) left: half-built layers in the store's
        staging area (live imports of other processes hold a lock and are kept), snapshot
        directories without a record, the trash, stale lower-tree caches."""
        sn = self._sn()
        report = sn.store.fsck_leftovers(repair=True)
        return list(report.repaired) + sn.cleanup()

    @staticmethod
    def _call(context: grpc.ServicerContext, what: str, fn: Callable[[], T]) -> T:
        t0 = time.perf_counter()
        try:
            out = fn()
            log.debug("%s: %.1f ms", what, (time.perf_counter() - t0) * 1000)
            return out
        except Exception as e:        # every failure becomes a status: containerd reads the code
            code = status_of(e)
            if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                log.exception("%s failed", what)
            else:
                log.info("%s: %s", what, e)
            context.abort(code, str(e))   # raises: the call ends with that status
            raise

    @staticmethod
    def _existing_ref(sn: Snapshotter, parent: str, labels: dict[str, str]) -> str | None:
        """The committed snapshot built from the layer containerd is about to extract (ref label)
        on exactly `parent`, if there is one."""
        ref = labels.get(REF_LABEL, "")
        if not ref:
            return None
        for info in sn.list(f'labels."{REF_LABEL}"=={json.dumps(ref)}'):
            if info.kind == "committed" and info.parent == parent:
                return info.name
        return None

    def _create(self, kind: str, request: Any) -> list:
        sn = self._sn()
        labels = dict(request.labels)
        check_labels(labels)
        if kind == "active":
            existing = self._existing_ref(sn, request.parent, labels)
            if existing is not None:
                raise AlreadyExists(f"target snapshot {labels[REF_LABEL]!r} already exists as {existing!r}")
        info = sn.create(kind, request.key, request.parent, labels)
        if self.binds is None:
            return convert.mounts_to_pb(sn.mounts(request.key, unpack.mount_options(request.key)))
        try:
            mounts = self.binds.ensure(sn, info)
        except BaseException:
            try:
                sn.remove(request.key)   # no snapshot without its mount
            except Exception as e:       # the mount's failure is what the caller must see
                log.warning("removing snapshot %r after its mount failed: %s", request.key, e)
            raise
        return convert.mounts_to_pb(mounts)

    def _mounts(self, key: str) -> list:
        sn = self._sn()
        if self.binds is None:
            return sn.mounts(key, unpack.mount_options(key))
        return self.binds.ensure(sn, sn.mountable(key))   # (the fuse3 mounts are not computed to be dropped)

    def _release(self, sn: Snapshotter, key: str) -> None:
        """Before a commit or remove: the daemon's own mount of the snapshot goes first."""
        if self.binds is not None and sn.stat(key).kind in ("active", "view"):
            self.binds.release(key)

    def _remove(self, key: str) -> None:
        sn = self._sn()
        self._release(sn, key)
        sn.remove(key, later=lambda path, intent: self._doomed.put((path, intent)))

    def _commit(self, request: pb.CommitSnapshotRequest) -> None:
        sn = self._sn()
        labels = dict(request.labels)
        check_labels(labels)
        ref = sn.stat(request.key).labels.get(REF_LABEL)
        if ref and REF_LABEL not in labels:
            labels[REF_LABEL] = ref      # what a later Prepare of the same layer finds it by
        self._release(sn, request.key)
        sn.commit(request.name, request.key, labels)

    # -- RPCs -----------------------------------------------------------------------
    def Prepare(self, request: pb.PrepareSnapshotRequest, context: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        mounts = self._call(context, f"prepare {request.key!r}", lambda: self._create("active", request))
        return pb.PrepareSnapshotResponse(mounts=mounts)

    def View(self, request: pb.ViewSnapshotRequest, context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        mounts = self._call(context, f"view {request.key!r}", lambda: self._create("view", request))
        return pb.ViewSnapshotResponse(mounts=mounts)

    def Mounts(self, request: pb.MountsRequest, context: grpc.ServicerContext) -> pb.MountsResponse:
        mounts = self._call(context, f"mounts {request.key!r}", lambda: self._mounts(request.key))
        return pb.MountsResponse(mounts=convert.mounts_to_pb(mounts))

    def Commit(self, request: pb.CommitSnapshotRequest, context: grpc.ServicerContext) -> Empty:
        self._call(context, f"commit {request.key!r} as {request.name!r}", lambda: self._commit(request))
        return Empty()

    def Remove(self, request: pb.RemoveSnapshotRequest, context: grpc.ServicerContext) -> Empty:
        self._call(context, f"remove {request.key!r}", lambda: self._remove(request.key))
        return Empty()

    def Stat(self, request: pb.StatSnapshotRequest, context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        info = self._call(context, f"stat {request.key!r}", lambda: self._sn().stat(request.key))
        return pb.StatSnapshotResponse(info=convert.info_to_pb(info))

    def Update(self, request: pb.UpdateSnapshotRequest, context: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        def update() -> Info:
            want = convert.info_from_pb(request.info)
            check_labels(want.labels)
            return self._sn().update(want, *request.update_mask.paths)
        info = self._call(context, f"update {request.info.name!r}", update)
        return pb.UpdateSnapshotResponse(info=convert.info_to_pb(info))

    def List(self, request: pb.ListSnapshotsRequest, context: grpc.ServicerContext) -> Iterator[pb.ListSnapshotsResponse]:
        def listing() -> list[pb.Info]:
            # Store layers are committed snapshots named by their chainID; containerd made none
            # of them (its names are namespaced), and its garbage collector removes every listed
            # snapshot it does not know: they stay out of the listing (Stat still finds them).
            return [convert.info_to_pb(i) for i in self._sn().list(*request.filters)
                    if not (i.kind == "committed" and i.name == i.chain_id)]
        infos = self._call(context, "list", listing)
        for i in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=infos[i:i + LIST_BATCH])

    def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> pb.UsageResponse:
        usage = self._call(context, f"usage {request.key!r}", lambda: self._sn().usage(request.key))
        return convert.usage_to_pb(usage)

    def Cleanup(self, request: pb.CleanupRequest, context: grpc.ServicerContext) -> Empty:
        removed = self._call(context, "cleanup", self._cleanup)
        log.info("cleanup removed %d leftovers", len(removed))
        return Empty()
