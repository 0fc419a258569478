"""Reordering a layer tar so chosen files come first, each member's bytes kept verbatim.

`scan()` finds every member's byte range in a tar (its extension headers,
header, payload and padding), `reorder()` plans the new order and `write()`
copies the ranges in that order. A file that moves brings what extracting it
needs ahead of it: its parent directories' entries, a whiteout of the same
name in this layer (producers put a whiteout before what replaces it), the
target of a hard link, and an opaque marker right after a directory. A name
that occurs twice in the layer stays where it is (the later one wins on
extraction; moving either could change which). After the moved members comes
the eStargz landmark `.prefetch.landmark`; a layer with nothing moved starts
with `.no.prefetch.landmark`. Landmarks already in the input are dropped.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import BinaryIO, Sequence

from ..errors import InvalidInput
from ..snapshots.changeset import encode_header, member
from ..snapshots.landmarks import CONTENT, NAMES, NO_PREFETCH, PREFETCH
from ..store.extract import normalize
from ..tarsplit import header
from ..tarsplit.parser import TarParser
from ..tarsplit.stream import ByteStream

CHUNK = 1 << 20
END = bytes(2 * header.BLOCK)
# Keys of a PAX global header that change no member (git archive writes the commit as a comment).
_HARMLESS_GLOBALS = {b"comment"}


@dataclass(slots=True)
class Span:
    name: bytes         # normalized path
    typeflag: bytes
    link: bytes         # a hard link's normalized target, else b""
    start: int          # first byte of its extension headers or header
    end: int            # after its payload's padding


def _pad(n: int) -> int:
    return -n % header.BLOCK


def _global_keys(seg: bytes, offset: int) -> set[bytes]:
    """Keys set by PAX global headers among a member's extension headers."""
    keys: set[bytes] = set()
    i = 0
    while i + header.BLOCK <= len(seg):
        hdr = header.parse_header(seg[i:i + header.BLOCK], offset + i)
        if hdr.typeflag not in header.EXTENSIONS:
            break
        if hdr.typeflag == header.PAX_GLOBAL:
            keys.update(k for k, _ in header.parse_pax(seg[i + header.BLOCK:i + header.BLOCK + hdr.size], offset + i))
        i += header.BLOCK + hdr.size + _pad(hdr.size)
    return keys


def scan(f: BinaryIO, what: str) -> list[Span]:
    """The members of the tar in `f`, in order (the end-of-archive blocks and anything after
    them are not members). A PAX global header that sets member fields is refused: it
    applies to every member after it, so no member could move across it."""
    stream = ByteStream(lambda: f.read(CHUNK))
    parser = TarParser(stream)
    spans: list[Span] = []
    start = 0
    while (m := parser.next()) is not None:
        data = stream.offset
        lead = len(m.segment) - (data - start)      # the previous member's padding
        keys = _global_keys(m.segment[lead:], start) - _HARMLESS_GLOBALS
        if keys:
            raise InvalidInput(f"{what}: a PAX global header sets {', '.join(sorted(k.decode('latin-1') for k in keys))}"
                               " for every member after it, so its members cannot be reordered")
        for _ in stream.chunks(m.size, "file data"):
            pass
        name = normalize(m.name)
        link = normalize(m.linkname, m.name) if m.typeflag == header.LNK else b""
        end = data + m.size + _pad(m.size)
        spans.append(Span(name, m.typeflag, link, start, end))
        start = end
    return spans


@dataclass
class Plan:
    order: list[int]                                     # span indexes; PREFETCH/NO_PREFETCH markers as -1/-2
    moved: list[bytes] = field(default_factory=list)     # the wanted names that come first
    stuck: list[bytes] = field(default_factory=list)     # wanted names left in place


LANDMARK, NO_LANDMARK = -1, -2


def reorder(spans: Sequence[Span], wanted: Sequence[bytes]) -> Plan:
    """The new order: `wanted` (layer paths, in this order) first with what they need, then
    the landmark, then every other member in its old order."""
    at: dict[bytes, int] = {}
    twice: set[bytes] = set()
    for i, s in enumerate(spans):
        if s.name in at:
            twice.add(s.name)
        at[s.name] = i
    taken: set[int] = set()
    front: list[int] = []

    def put(name: bytes) -> None:
        i = at.get(name)
        if i is not None and name not in twice and i not in taken:
            taken.add(i)
            front.append(i)

    def take(name: bytes) -> bool:
        """Move `name` and what it needs; False if it has to stay."""
        i = at.get(name)
        if i is None or name in twice:
            return False
        if i in taken:
            return True
        parent, _, base = name.rpartition(b"/")
        if parent:
            take(parent)            # a directory entry the layer has; else it is implicit
        put((parent + b"/" if parent else b"") + b".wh." + base)
        s = spans[i]
        if s.typeflag == header.LNK and s.link in at and not take(s.link):
            return False            # the target cannot move ahead of the link
        put(name)
        if s.typeflag == header.DIR:
            put(name + b"/.wh..wh..opq")
        return True

    plan = Plan([])
    for name in wanted:
        (plan.moved if take(name) else plan.stuck).append(name)
    rest = [i for i, s in enumerate(spans) if i not in taken and s.name not in NAMES]
    plan.order = front + [LANDMARK] + rest if front else [NO_LANDMARK] + rest
    return plan


def landmark_member(name: bytes) -> bytes:
    """A landmark member as eStargz writes it: a one-byte regular file at the root."""
    return encode_header(member(name, "reg", 0o644, size=len(CONTENT))) + CONTENT + bytes(_pad(len(CONTENT)))


def write(src: BinaryIO, spans: Sequence[Span], order: Sequence[int], dst: BinaryIO) -> str:
    """Write the members of `src` in `order`, then the end-of-archive blocks; returns the
    sha256 digest of what was written (the new layer's diffID)."""
    h = hashlib.sha256()
    sfd = src.fileno()

    def out(b: bytes | memoryview) -> None:
        h.update(b)
        dst.write(b)

    for i in order:
        if i < 0:
            out(landmark_member(PREFETCH if i == LANDMARK else NO_PREFETCH))
            continue
        off, left = spans[i].start, spans[i].end - spans[i].start
        while left:
            b = os.pread(sfd, min(CHUNK, left), off)
            if not b:
                raise InvalidInput(f"the layer tar ended inside member {spans[i].name.decode(errors='replace')}")
            out(b)
            off += len(b)
            left -= len(b)
    out(END)
    return "sha256:" + h.hexdigest()
