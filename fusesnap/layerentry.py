"""The record a layer's index yields per member: the contract between the store and the filesystem.

The store produces these from a layer's tar-split index (metadata as the tar
recorded it, not as it landed on the host); the filesystem's index-backed lower
consumes them. Whiteout markers (`.wh.NAME`, `.wh..wh..opq`) are ordinary
'reg' entries here: interpreting them is the filesystem's job.
"""

from __future__ import annotations

import stat as S
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["reg", "dir", "sym", "hard", "chr", "blk", "fifo"]

# A file type's st_mode format bits and its kind ("sock": host sockets only, no tar holds one).
FMT_OF_KIND: dict[str, int] = {"reg": S.S_IFREG, "dir": S.S_IFDIR, "sym": S.S_IFLNK, "chr": S.S_IFCHR,
                               "blk": S.S_IFBLK, "fifo": S.S_IFIFO, "sock": S.S_IFSOCK}
KIND_OF_FMT: dict[int, str] = {v: k for k, v in FMT_OF_KIND.items()}


def kind_of_mode(mode: int) -> str:
    """The kind of an st_mode ("reg" for anything unknown)."""
    return KIND_OF_FMT.get(S.S_IFMT(mode), "reg")


@dataclass(slots=True)
class LayerEntry:
    path: bytes
    """Normalized path relative to the layer root: no leading './' or '/', no trailing '/', never empty."""
    kind: Kind
    mode: int
    """Permission bits including setuid/setgid/sticky (mask 0o7777), as in the tar."""
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    """Payload size of a 'reg' entry."""
    linkname: bytes = b""
    """Symlink target as stored; for 'hard', the normalized path of the target in the same layer."""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    data: bytes | None = None
    """For 'reg': path relative to the layer's fs/ directory that holds the content."""
