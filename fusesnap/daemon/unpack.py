"""The snapshots containerd unpacks layers into, and how their mounts differ.

containerd names the active snapshot it extracts a layer into
`extract-<unique> <chainID>` (its snapshots.UnpackKeyFormat; a proxy snapshotter
sees the namespace in front: `NS/ID/extract-...`), and its own Windows, CimFS
and EROFS snapshotters recognise unpacking by that prefix of the key's last
component, as done here. The CRI plugin also labels such a Prepare
`containerd.io/snapshot.ref`; `ctr images pull` does not, so the key is what
every path has.

Nothing but the unpacker uses such a mount: it writes the layer's files,
closes each checking close's error, and commits. So it gets the kernel's
writeback cache (`writeback=1`): containerd writes in 32 KiB pieces, which
then reach the daemon merged (a 60 MB file: 68 WRITE requests instead of
1,900). What writeback=1 costs elsewhere (docs/BENCHMARKS.md: st_blocks
forgotten at every close, a full disk reported by close() or fsync() instead
of write()) does not matter to an unpacker that checks close().
"""

from __future__ import annotations

from ..snapshots.mounting import container_options

UNPACK_KEY_PREFIX = "extract"
UNPACK_OPTIONS = ("writeback=1",)


def is_unpack_key(key: str) -> bool:
    """Whether `key` names a snapshot containerd extracts a layer into."""
    return key.rsplit("/", 1)[-1].startswith(UNPACK_KEY_PREFIX)


def mount_options(key: str) -> list[str]:
    """Options for the mount of snapshot `key` beyond a container's (mounting.container_options)."""
    return list(UNPACK_OPTIONS) if is_unpack_key(key) else []


def options_for(key: str) -> list[str]:
    """All the options the daemon mounts snapshot `key` with."""
    return container_options() + mount_options(key)
