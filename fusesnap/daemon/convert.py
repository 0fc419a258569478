"""Snapshotter objects <-> containerd's protobuf messages (Info, Mount, Usage, Kind)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from ..snapshots.snapshotter import Info, Mount, Usage
from .pb import mount_pb2, snapshots_pb2 as pb

KIND_TO_PB = {"view": pb.VIEW, "active": pb.ACTIVE, "committed": pb.COMMITTED}
KIND_FROM_PB = {v: k for k, v in KIND_TO_PB.items()}


def timestamp(ns: int) -> Timestamp:
    secs, nanos = divmod(ns, 1_000_000_000)
    return Timestamp(seconds=secs, nanos=nanos)


def ns_of(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(name=info.name, parent=info.parent, kind=KIND_TO_PB[info.kind],
                   created_at=timestamp(info.created), updated_at=timestamp(info.updated),
                   labels=info.labels)


def info_from_pb(msg: pb.Info) -> Info:
    return Info(name=msg.name, kind=KIND_FROM_PB.get(msg.kind, "committed"), parent=msg.parent,
                labels=dict(msg.labels), created=ns_of(msg.created_at), updated=ns_of(msg.updated_at))


def mounts_to_pb(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options) for m in mounts]


def mounts_from_pb(msgs: list[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(type=m.type, source=m.source, target=m.target, options=list(m.options)) for m in msgs]


def usage_to_pb(u: Usage) -> pb.UsageResponse:
    return pb.UsageResponse(size=u.size, inodes=u.inodes)
