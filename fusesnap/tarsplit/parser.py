"""Streaming tar member parser that keeps every raw byte it consumes.

Each `Member` carries `segment`: the bytes between the previous member's payload
and this member's payload (previous padding, PAX/GNU extension headers, the header
block, oldgnu sparse extension blocks, a PAX 1.0 sparse map). Replaying segments
and payloads in order reproduces the input exactly; that is what the tar-split
index records.

Like GNU tar, the first zero block ends the archive; the rest (second zero block,
junk) is the trailer. Like Go's archive/tar and Python's tarfile, hard links,
symlinks, devices, fifos and directories carry no payload whatever their size field says.
"""

from __future__ import annotations

import base64
import urllib.parse
from ..errors import InvalidInput
from . import header
from .member import Member
from .stream import ByteStream

__all__ = ["Member", "TarParser", "MAX_EXTENSION"]

MAX_EXTENSION = 64 << 20  # PAX / GNU long-name data larger than this is hostile


def _pad(n: int) -> int:
    return -n % header.BLOCK


class TarParser:
    def __init__(self, stream: ByteStream) -> None:
        self.s = stream
        self._pending_pad = 0
        self._globals: dict[bytes, bytes] = {}
        self.end_segment = b""  # bytes of the end marker (padding + first zero block)
        self.members = 0

    def next(self) -> Member | None:
        """The next member; the caller must then consume exactly `member.size` payload bytes."""
        s = self.s
        seg = bytearray()
        if self._pending_pad:
            seg += s.read_exact(self._pending_pad, "padding")
            self._pending_pad = 0
        pax: list[tuple[bytes, bytes]] = []
        longname: bytes | None = None
        longlink: bytes | None = None
        while True:
            off = s.offset
            block = s.read_upto(header.BLOCK)
            if not block or block == header.ZERO_BLOCK:
                if pax or longname is not None or longlink is not None:
                    raise InvalidInput(f"truncated tar: extension header at offset {off} has no member")
                if not block and self.members == 0 and off == 0:
                    raise InvalidInput("empty input: not a tar archive")
                seg += block
                self.end_segment = bytes(seg)
                return None
            if len(block) < header.BLOCK:
                raise InvalidInput(f"truncated tar header at offset {off}")
            seg += block
            hdr = header.parse_header(block, off)
            t = hdr.typeflag
            if t in header.EXTENSIONS:
                if hdr.size > MAX_EXTENSION:
                    raise InvalidInput(f"absurd extension header size {hdr.size} at offset {off}")
                data = s.read_exact(hdr.size, "extension header")
                seg += data
                seg += s.read_exact(_pad(hdr.size), "padding")
                if t == header.PAX:
                    pax.extend(header.parse_pax(data, off))
                elif t == header.PAX_GLOBAL:
                    for k, v in header.parse_pax(data, off):
                        self._globals[k] = v
                elif t == header.GNU_LONGNAME:
                    longname = header.cstr(data)
                elif t == header.GNU_LONGLINK:
                    longlink = header.cstr(data)
                continue
            m = self._member(hdr, off, seg, pax, longname, longlink)
            self.members += 1
            self._pending_pad = _pad(m.size)
            return m

    def _member(self, hdr: header.Header, off: int, seg: bytearray, pax: list[tuple[bytes, bytes]],
                longname: bytes | None, longlink: bytes | None) -> Member:
        s = self.s
        name = longname if longname is not None else hdr.name
        linkname = longlink if longlink is not None else hdr.linkname
        uid, gid, uname, gname = hdr.uid, hdr.gid, hdr.uname, hdr.gname
        mtime_ns = hdr.mtime * 1_000_000_000
        size = hdr.size
        devmajor, devminor = hdr.devmajor, hdr.devminor
        xattrs: dict[bytes, bytes] = {}
        sp: dict[bytes, bytes] = {}
        sp_pairs: list[int] = []
        records = list(self._globals.items()) + pax if self._globals else pax
        for k, v in records:
            try:
                if k == b"path":
                    name = v
                elif k == b"linkpath":
                    linkname = v
                elif k == b"size":
                    size = int(v)
                elif k == b"uid":
                    uid = int(v)
                elif k == b"gid":
                    gid = int(v)
                elif k == b"uname":
                    uname = v
                elif k == b"gname":
                    gname = v
                elif k == b"mtime":
                    mtime_ns = header.parse_pax_time(v)
                elif k.startswith(b"SCHILY.xattr."):
                    xattrs[k[13:]] = v
                elif k.startswith(b"LIBARCHIVE.xattr."):
                    xname = urllib.parse.unquote_to_bytes(k[17:])
                    if xname not in xattrs:
                        xattrs[xname] = base64.b64decode(v + b"=" * (-len(v) % 4))
                elif k == b"SCHILY.devmajor":
                    devmajor = int(v)
                elif k == b"SCHILY.devminor":
                    devminor = int(v)
                elif k in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
                    sp_pairs.append(int(v))
                elif k.startswith(b"GNU.sparse."):
                    sp[k[11:]] = v
            except ValueError:
                raise InvalidInput(f"bad PAX value for {k.decode('latin-1')} at offset {off}") from None
        if size < 0 or size > header.MAX_SIZE:
            raise InvalidInput(f"absurd size {size} in tar header at offset {off}")
        t = hdr.typeflag
        if t in header.HEADER_ONLY:
            size = 0
        realsize = size
        sparse: list[tuple[int, int]] | None = None
        if t == header.GNU_SPARSE and hdr.gnu:
            b = hdr.block
            sparse = header.gnu_sparse_entries(b, 386, 4)
            extended = b[482]
            realsize = header.parse_number(b[483:495], "realsize")
            while extended:
                ext = s.read_exact(header.BLOCK, "sparse header")
                seg += ext
                sparse += header.gnu_sparse_entries(ext, 0, 21)
                extended = ext[504]
        elif sp or sp_pairs:
            if b"name" in sp:
                name = sp[b"name"]
            if sp.get(b"major") == b"1" and sp.get(b"minor") == b"0":
                realsize = int(sp.get(b"realsize", b"0"))
                sparse, used = self._read_sparse_map_1_0(off)
                seg += used
                size -= len(used)
            else:
                realsize = int(sp.get(b"size", sp.get(b"realsize", b"0")))
                if b"map" in sp:
                    nums = [int(x) for x in sp[b"map"].split(b",") if x]
                else:
                    nums = sp_pairs
                if len(nums) % 2:
                    raise InvalidInput(f"bad GNU sparse map at offset {off}")
                sparse = list(zip(nums[::2], nums[1::2]))
        if sparse is not None:
            total = 0
            end = 0
            for o, n in sparse:
                if o < end or n < 0 or o + n > realsize:
                    raise InvalidInput(f"bad sparse map at offset {off}")
                end = o + n
                total += n
            if total != size:
                raise InvalidInput(f"sparse map does not match the data size at offset {off}")
        return Member(
            segment=bytes(seg), offset=off, name=name, linkname=linkname, typeflag=t,
            mode=hdr.mode & 0o7777, uid=uid, gid=gid, mtime_ns=mtime_ns, uname=uname, gname=gname,
            devmajor=devmajor, devminor=devminor, size=size, realsize=realsize, sparse=sparse,
            xattrs=xattrs,
        )

    def _read_sparse_map_1_0(self, off: int) -> tuple[list[tuple[int, int]], bytes]:
        """PAX sparse 1.0: decimal numbers, one per line, at the start of the data, block-padded."""
        buf = bytearray()
        nums: list[int] = []
        want = None
        pos = 0
        while want is None or len(nums) < want:
            if pos >= len(buf):
                if len(buf) > MAX_EXTENSION:
                    raise InvalidInput(f"absurd GNU sparse map at offset {off}")
                buf += self.s.read_exact(header.BLOCK, "sparse map")
            nl = buf.find(b"\n", pos)
            if nl < 0:
                if len(buf) > MAX_EXTENSION:
                    raise InvalidInput(f"absurd GNU sparse map at offset {off}")
                buf += self.s.read_exact(header.BLOCK, "sparse map")
                continue
            try:
                v = int(buf[pos:nl])
            except ValueError:
                raise InvalidInput(f"bad GNU sparse map at offset {off}") from None
            pos = nl + 1
            if want is None:
                want = 2 * v
                if v > 1 << 24:
                    raise InvalidInput(f"absurd GNU sparse map at offset {off}")
            else:
                nums.append(v)
        return list(zip(nums[::2], nums[1::2])), bytes(buf)
