"""Generated protobuf/gRPC modules for containerd's Snapshots service (scripts/gen-proto; do not edit).

The .proto files beside them are this repository's own transcription of
containerd's api/services/snapshots/v1/snapshots.proto and api/types/mount.proto
(same packages, messages and field numbers).
"""
