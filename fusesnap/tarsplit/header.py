"""Decoding 512-byte tar header blocks (v7, ustar, GNU/oldgnu, star-less) and PAX records.

Only decoding lives here: the raw bytes are never re-encoded, export replays them.
Every malformed field raises InvalidInput with a message naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidInput

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
MAX_SIZE = 1 << 62  # anything bigger is an absurd size field, not a file

# typeflags
REG, AREG, LNK, SYM, CHR, BLK, DIR, FIFO, CONT = b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7"
PAX, PAX_GLOBAL, GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE = b"x", b"g", b"L", b"K", b"S"
GNU_DUMPDIR, GNU_VOLHDR, GNU_MULTIVOL = b"D", b"V", b"M"
SOLARIS_XATTR = b"X"

#: types whose size field does not announce data (Go's isHeaderOnlyType, Python tarfile agree)
HEADER_ONLY = frozenset({LNK, SYM, CHR, BLK, DIR, FIFO})
# A typeflag's kind (fusesnap.layerentry.Kind) when reading, and the flag written for a kind.
KIND_OF_TYPEFLAG = {REG: "reg", AREG: "reg", CONT: "reg", LNK: "hard", SYM: "sym", CHR: "chr",
                    BLK: "blk", DIR: "dir", FIFO: "fifo", GNU_SPARSE: "reg", GNU_DUMPDIR: "dir"}
TYPEFLAG_OF_KIND = {"reg": REG, "dir": DIR, "sym": SYM, "hard": LNK, "chr": CHR, "blk": BLK, "fifo": FIFO}
#: extension headers that describe the next member instead of being one
EXTENSIONS = frozenset({PAX, PAX_GLOBAL, GNU_LONGNAME, GNU_LONGLINK, SOLARIS_XATTR})


def cstr(field: bytes) -> bytes:
    """A NUL-terminated string field."""
    i = field.find(b"\0")
    return field if i < 0 else field[:i]


def parse_number(field: bytes, what: str) -> int:
    """Octal (NUL/space padded) or GNU base-256 numeric field."""
    if field and field[0] & 0x80:
        # base-256: first byte 0x80 (positive) or 0xff (negative, two's complement)
        v = int.from_bytes(field, "big", signed=False)
        if field[0] == 0xFF:
            v -= 1 << (8 * len(field))
        else:
            v &= (1 << (8 * len(field) - 1)) - 1
        return v
    try:
        return int(field.rstrip(b"\0 ") or b"0", 8)  # fast path: "0000644\0", "  644 \0"
    except ValueError:
        pass
    s = field.replace(b"\0", b" ").strip()
    try:
        return int(s or b"0", 8)
    except ValueError:
        raise InvalidInput(f"bad {what} field {bytes(field)!r} in tar header") from None


def checksum_ok(block: bytes) -> bool:
    """Unsigned (POSIX) or signed (old Sun tars) sum with the checksum field as spaces."""
    try:
        want = parse_number(block[148:156], "checksum")
    except InvalidInput:
        return False
    unsigned = sum(block) - sum(block[148:156]) + 256
    if want == unsigned:
        return True
    signed = sum((b - 256 if b > 127 else b) for b in block[:148]) + 256
    signed += sum((b - 256 if b > 127 else b) for b in block[156:])
    return want == signed


@dataclass(slots=True)
class Header:
    """The fields of one header block, as recorded (before PAX/GNU overrides)."""

    name: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    typeflag: bytes
    linkname: bytes
    uname: bytes
    gname: bytes
    devmajor: int
    devminor: int
    gnu: bool  # GNU/oldgnu magic: sparse fields live in the block
    block: bytes


def parse_header(block: bytes, offset: int) -> Header:
    """Decode one non-zero header block found at stream `offset` (for error messages)."""
    if not checksum_ok(block):
        raise InvalidInput(f"bad tar header checksum at offset {offset}")
    magic = block[257:263]
    version = block[263:265]
    gnu = magic == b"ustar " and version == b" \0"
    name = cstr(block[0:100])
    if magic == b"ustar\0":
        prefix = cstr(block[345:500])
        if prefix:
            name = prefix + b"/" + name
    typeflag = block[156:157]
    size = parse_number(block[124:136], "size")
    if size < 0 or size > MAX_SIZE:
        raise InvalidInput(f"absurd size {size} in tar header at offset {offset}")
    return Header(
        name=name,
        mode=parse_number(block[100:108], "mode"),
        uid=parse_number(block[108:116], "uid"),
        gid=parse_number(block[116:124], "gid"),
        size=size,
        mtime=parse_number(block[136:148], "mtime"),
        typeflag=typeflag,
        linkname=cstr(block[157:257]),
        uname=cstr(block[265:297]),
        gname=cstr(block[297:329]),
        devmajor=parse_number(block[329:337], "devmajor") if typeflag in (CHR, BLK) else 0,
        devminor=parse_number(block[337:345], "devminor") if typeflag in (CHR, BLK) else 0,
        gnu=gnu,
        block=block,
    )


def gnu_sparse_entries(block: bytes, start: int, count: int) -> list[tuple[int, int]]:
    """(offset, numbytes) pairs of an oldgnu sparse map (in the header or an extension block)."""
    out = []
    for i in range(count):
        o = start + 24 * i
        if block[o] == 0:
            break
        out.append((parse_number(block[o : o + 12], "sparse offset"), parse_number(block[o + 12 : o + 24], "sparse numbytes")))
    return out


def parse_pax(data: bytes, offset: int) -> list[tuple[bytes, bytes]]:
    """PAX extended header records `LEN KEY=VALUE\\n`, in order (GNU sparse 0.0 repeats keys)."""
    out: list[tuple[bytes, bytes]] = []
    pos = 0
    n = len(data)
    while pos < n:
        if data[pos] == 0:  # NUL padding after the last record (seen in the wild)
            break
        sp = data.find(b" ", pos, pos + 24)
        if sp < 0:
            raise InvalidInput(f"bad PAX record at offset {offset}")
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise InvalidInput(f"bad PAX record length at offset {offset}") from None
        end = pos + length
        if length <= sp - pos + 1 or end > n or data[end - 1 : end] != b"\n":
            raise InvalidInput(f"bad PAX record at offset {offset}")
        rec = data[sp + 1 : end - 1]
        key, eq, value = rec.partition(b"=")
        if not eq:
            raise InvalidInput(f"bad PAX record (no '=') at offset {offset}")
        out.append((key, value))
        pos = end
    return out


def parse_pax_time(v: bytes) -> int:
    """PAX decimal seconds (may be negative, may have a fraction) -> nanoseconds."""
    s = v.decode("ascii", "replace").strip()
    neg = s.startswith("-")
    if neg:
        s = s[1:]
    whole, _, frac = s.partition(".")
    try:
        ns = int(whole or "0") * 1_000_000_000 + int((frac + "000000000")[:9] or "0")
    except ValueError:
        raise InvalidInput(f"bad PAX time {v!r}") from None
    return -ns if neg else ns
