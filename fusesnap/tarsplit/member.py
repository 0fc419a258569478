"""One tar member: what the parser reads from a header and what the changeset writer encodes.

The parser fills every header field plus `segment` (the raw bytes before the
payload, which the tar-split index keeps) and the sparse map; the writer fills
the header fields plus `source` (the host file holding a regular member's
content). `kind` names the file type the way LayerEntry does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import header


@dataclass(slots=True)
class Member:
    name: bytes
    typeflag: bytes
    mode: int = 0  # permission bits incl. setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0  # payload bytes that follow in the archive
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    uname: bytes = b""
    gname: bytes = b""
    realsize: int = 0  # logical size of a sparse file (parsed); else equal to size
    sparse: list[tuple[int, int]] | None = None
    segment: bytes = b""  # raw bytes between the previous payload and this one (parsed)
    offset: int = 0  # stream offset of the member's header block (parsed)
    source: Path | None = None  # host file with a regular member's content (written)

    @property
    def kind(self) -> str:
        """reg, dir, sym, hard, chr, blk or fifo (anything unknown reads as reg, as tar does)."""
        return header.KIND_OF_TYPEFLAG.get(self.typeflag, "reg")
