"""`fusesnap serve`: containerd's Snapshots gRPC service over a store (a proxy snapshotter).

errmap.py turns fusesnap errors into the gRPC codes containerd's errdefs read,
convert.py maps Snapshotter objects to and from the protobuf messages,
service.py is the servicer, server.py owns the socket and the process's life,
client.py is a Snapshotter-shaped client of the service (tests, benchmarks).
"""
