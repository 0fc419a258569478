"""The committed protobuf/gRPC modules are what scripts/gen-proto makes of the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fusesnap.daemon.pb import mount_pb2, snapshots_pb2

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_current():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the test extra) regenerates the code")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gen-proto"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_wire_names_are_containerds():
    """What containerd's client puts on the wire: full names and field numbers (api/types/mount.proto,
    api/services/snapshots/v1/snapshots.proto)."""
    svc = snapshots_pb2.DESCRIPTOR.services_by_name["Snapshots"]
    assert svc.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert [m.name for m in svc.methods] == ["Prepare", "View", "Mounts", "Commit", "Remove", "Stat", "Update",
                                             "List", "Usage", "Cleanup"]
    assert svc.methods_by_name["List"].server_streaming   # type: ignore[attr-defined]
    assert mount_pb2.Mount.DESCRIPTOR.full_name == "containerd.types.Mount"
    assert {f.name: f.number for f in mount_pb2.Mount.DESCRIPTOR.fields} == {
        "type": 1, "source": 2, "target": 3, "options": 4}
    info = snapshots_pb2.Info.DESCRIPTOR
    assert {f.name: f.number for f in info.fields} == {
        "name": 1, "parent": 2, "kind": 3, "created_at": 4, "updated_at": 5, "labels": 6}
    assert dict(snapshots_pb2.Kind.items()) == {"UNKNOWN": 0, "VIEW": 1, "ACTIVE": 2, "COMMITTED": 3}
    update = snapshots_pb2.UpdateSnapshotRequest.DESCRIPTOR
    assert {f.name: f.number for f in update.fields} == {"snapshotter": 1, "info": 2, "update_mask": 3}
    commit = snapshots_pb2.CommitSnapshotRequest.DESCRIPTOR
    assert {f.name: f.number for f in commit.fields} == {"snapshotter": 1, "name": 2, "key": 3, "labels": 4}
