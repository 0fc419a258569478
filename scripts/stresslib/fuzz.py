"""Hostile inputs: seeded mutations of valid layer tars (plain, gzip, zstd) and hand-made nasty
ones. Each import either succeeds and exports byte for byte what went in (decompressed), or
fails with one line; the store stays consistent either way."""

from __future__ import annotations

import gzip
import io
import random
import tarfile

import zstandard

from .common import Cli, StressFailure, one_line_error, random_tar


def _nasty(rnd: random.Random) -> bytes:
    """Names and links that try to escape, lie about sizes, or replace what came before."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=rnd.choice((tarfile.PAX_FORMAT, tarfile.GNU_FORMAT))) as t:
        for _ in range(rnd.randrange(2, 8)):
            kind = rnd.choice(("abs", "dotdot", "symlink-escape", "through-link", "hard-escape", "dup", "dir-over",
                               "long", "dev"))
            ti = tarfile.TarInfo({"abs": "/etc/passwd", "dotdot": "a/../../x", "long": "d/" * 300 + "f"}
                                 .get(kind, f"n{rnd.randrange(4)}"))
            if kind == "symlink-escape":
                ti.type, ti.linkname = tarfile.SYMTYPE, "/" + "../" * 8 + "etc"
            elif kind == "through-link":
                ti.type, ti.linkname = tarfile.SYMTYPE, "/etc"
                t.addfile(ti)
                ti = tarfile.TarInfo(f"{ti.name}/passwd")
            elif kind == "hard-escape":
                ti.type, ti.linkname = tarfile.LNKTYPE, "../outside"
            elif kind == "dir-over":
                ti.type = tarfile.DIRTYPE
                t.addfile(ti)
                ti = tarfile.TarInfo(ti.name)
            elif kind == "dev":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            data = rnd.randbytes(rnd.choice((0, 10, 3000))) if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else b""
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _mutate(rnd: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    how = rnd.choice(("flip", "truncate", "junk", "zero-block", "size-field", "splice"))
    if how == "flip":
        for _ in range(rnd.randrange(1, 20)):
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
    elif how == "truncate":
        del b[rnd.randrange(len(b)):]
    elif how == "junk":
        b += rnd.randbytes(rnd.randrange(1, 5000))
    elif how == "zero-block":
        i = rnd.randrange(0, max(len(b) // 512, 1)) * 512
        b[i:i + 512] = bytes(512)
    elif how == "size-field" and len(b) >= 512:
        i = rnd.randrange(0, len(b) // 512) * 512
        b[i + 124:i + 136] = rnd.choice((b"77777777777\0", b"\x80" + bytes(10) + b"\x01", b"-1         \0"))
    else:
        i, j = sorted(rnd.randrange(len(b)) for _ in range(2))
        b[i:i] = b[i:j]
    return bytes(b)


def _uncompressed(data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    return data


def fuzz(cli: Cli, rnd: random.Random, n: int) -> tuple[int, int]:
    """Import n hostile inputs; returns (accepted, refused)."""
    accepted = refused = 0
    for i in range(n):
        base = _nasty(rnd) if rnd.random() < 0.3 else random_tar(rnd, rnd.randrange(1, 15))
        data = _mutate(rnd, base) if rnd.random() < 0.8 else base
        comp = rnd.choice(("plain", "gzip", "zstd"))
        if comp == "gzip":
            data = gzip.compress(data, mtime=0)
        elif comp == "zstd":
            data = zstandard.ZstdCompressor().compress(data)
        if rnd.random() < 0.2:
            data = _mutate(rnd, data)  # damage the compressed stream too
        r = cli.run("import", "--label", "fusesnap.io/gc.root=", "-", input=data)
        one_line_error(r, f"hostile input {i}")
        if r.returncode:
            refused += 1
            continue
        accepted += 1
        chain = r.stdout.split()[0].decode()
        out = cli.ok("export", chain)
        try:
            want = _uncompressed(data)
        except (OSError, EOFError, zstandard.ZstdError):
            want = None
        if want is not None and out != want:
            raise StressFailure(f"hostile input {i} was accepted but exports different bytes")
    cli.ok("gc")
    return accepted, refused
