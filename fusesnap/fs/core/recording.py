"""The access log: which files a workload touches, in first-access order, and from which layer.

What it is for: warming a cold start (read those files first) and optimising an
image (put them first in each layer), as stargz-snapshotter's recorder does.
Each line is JSON: {"path", "layer_index", "chain_id", "size"}; layer_index is
the position in the chain of the layer that serves the file (bottom 0; the
upper counts as one more, on top), so a path whited out above a lower layer is
never attributed to it. The FUSE layer calls `note()` where a file's content
is first asked for (fs/fuse/operations.py says which requests).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from fusesnap.fs.core.inodes import Inode


def record_line(path: bytes | str, layer_index: int, chain_id: str | None, size: int) -> bytes:
    """One line of a record (also what fusesnap.snapshots.accessrecord writes and reads)."""
    line = json.dumps({"path": os.fsdecode(path), "layer_index": layer_index, "chain_id": chain_id, "size": size},
                      ensure_ascii=False)
    return line.encode("utf-8", "surrogateescape") + b"\n"


class AccessLog:
    __slots__ = ("fd", "roots", "upper_index", "seen")

    def __init__(self, fd: int, layers: Sequence[tuple[bytes | str, str | None]]) -> None:
        """fd: where the lines go (the log owns it); layers: bottom first, each (directory
        holding the layer's files, chainID or None)."""
        self.fd = fd
        roots = [(os.fsencode(root).rstrip(b"/") + b"/", idx, chain) for idx, (root, chain) in enumerate(layers)]
        # the longest root first: a layer directory may be a prefix of another's name
        self.roots = sorted(roots, key=lambda r: len(r[0]), reverse=True)
        self.upper_index = len(layers)
        self.seen: set[int] = set()

    @classmethod
    def create(cls, path: str, layers: Sequence[tuple[bytes | str, str | None]]) -> "AccessLog":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        return cls(fd, layers)

    def layer_of(self, src: bytes) -> tuple[int, str | None]:
        """The layer whose directory holds a lower file's data."""
        for root, idx, chain in self.roots:
            if src.startswith(root):
                return idx, chain
        return -1, None

    def note(self, i: Inode, size: int) -> None:
        """Record i once (later calls for it return at once)."""
        if i.ino in self.seen:
            return
        self.seen.add(i.ino)
        try:
            path = i.path()
        except FileNotFoundError:
            return              # no name left: nothing a later workload could ask for
        if i.upper or i.lower is None:
            idx, chain = self.upper_index, None
        else:
            idx, chain = self.layer_of(i.lower.src)
        os.write(self.fd, record_line(path, idx, chain, size))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
