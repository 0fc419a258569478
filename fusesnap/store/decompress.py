"""One streaming pass over a layer blob: detect plain/gzip/zstd by magic, decompress, hash both sides.

`LayerStream.next_chunk()` yields uncompressed chunks and feeds them to the diffID hash;
the compressed bytes (when there are any) feed the compressed-digest hash as they are read.
Corrupt or truncated compressed input raises InvalidInput with a one-line reason.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import zstandard

from ..errors import InvalidInput

READ_SIZE = 1 << 20
OUT_MAX = 1 << 20
ZSTD_BLOCKS = 8  # zstd blocks per decompress call: each regenerates at most 128 KiB, so <= 1 MiB out
ZSTD_MAGIC_LE = 0xFD2FB528
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
OTHER_MAGIC = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


class ThreadedSha256:
    """sha256 fed from a queue by a worker thread: hashlib drops the GIL on big updates,
    so hashing overlaps with parsing and writing files in the main thread."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=16)  # <= 16 chunks of <= ~1 MiB in flight
        self._t = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._t.start()
        self._digest: str | None = None

    def _run(self) -> None:
        while (b := self._q.get()) is not None:
            self._h.update(b)

    def update(self, b: bytes) -> None:
        self._q.put(b)

    def hexdigest(self) -> str:
        if self._digest is None:
            self.close()
            self._digest = self._h.hexdigest()
        return self._digest

    def close(self) -> None:
        """Let the worker hash what is queued, then stop it; idempotent."""
        if self._t.is_alive():
            self._q.put(None)
            self._t.join()


class ZstdPacer:
    """How many compressed bytes may go to zstd at once, so that one call cannot produce more
    than ZSTD_BLOCKS blocks of output (a 32 KiB zstd frame can hold 1 GiB of zeros).

    Walks the frame format (RFC 8878): frame header, then blocks with a 3-byte header
    each (raw, RLE or compressed; each regenerates at most 128 KiB), an optional 4-byte
    checksum; skippable frames. Anything else is handed over whole for zstd to refuse."""

    def __init__(self) -> None:
        self.left = 0  # bytes of the current header, block content or checksum still to pass
        self.after = "frame"  # what comes once `left` is passed: frame, block or checksum
        self.checksum = False

    def allowance(self, buf: memoryview) -> int:
        """Bytes of buf (which starts where the last allowance ended) that may be fed now;
        0 when a header is cut and more input is needed first."""
        pos = 0
        blocks = 0
        end = len(buf)
        while True:
            if self.left:
                take = min(self.left, end - pos)
                pos += take
                self.left -= take
                if self.left:
                    return pos
                if self.after == "checksum":
                    self.left, self.after = 4, "frame"
                    continue
            if pos == end:
                return pos
            if self.after == "frame":
                if end - pos < 8:
                    return pos
                magic = int.from_bytes(buf[pos:pos + 4], "little")
                if magic == ZSTD_MAGIC_LE:
                    fhd = buf[pos + 4]
                    single = (fhd >> 5) & 1
                    fcs = (0 if not single else 1, 2, 4, 8)[fhd >> 6]
                    self.left = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + fcs
                    self.checksum = bool(fhd & 4)
                    self.after = "block"
                elif magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
                    self.left = 8 + int.from_bytes(buf[pos + 4:pos + 8], "little")
                    self.after = "frame"
                else:
                    return end  # not a frame: zstd reports it
                continue
            # a block header
            if blocks >= ZSTD_BLOCKS:
                return pos
            if end - pos < 3:
                return pos
            hdr = int.from_bytes(buf[pos:pos + 3], "little")
            btype = (hdr >> 1) & 3
            if btype == 3:
                return end  # reserved block type: zstd reports it
            self.left = 3 + (1 if btype == 1 else hdr >> 3)
            blocks += 1
            if hdr & 1:
                self.after = "checksum" if self.checksum else "frame"
            else:
                self.after = "block"


class LayerStream:
    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self.compressed_hash = hashlib.sha256()
        self.diff_hash = ThreadedSha256()
        self.compressed_size = 0
        self.size = 0
        self._hash_raw = False  # only compressed input needs its own digest
        first = self._read_raw()
        while first and len(first) < 6:  # pipes may deliver the magic bytes in pieces
            more = self._read_raw()
            if not more:
                break
            first += more
        if first.startswith(GZIP_MAGIC) or first.startswith(ZSTD_MAGIC):
            self._hash_raw = True
            self.compressed_hash.update(first)
        if first.startswith(GZIP_MAGIC):
            self.compression = "gzip"
            self._it = self._gzip(first)
        elif first.startswith(ZSTD_MAGIC):
            self.compression = "zstd"
            self._it = self._zstd(first)
        else:
            for magic, what in OTHER_MAGIC.items():
                if first.startswith(magic):
                    raise InvalidInput(f"{what}-compressed input is not supported (plain, gzip or zstd)")
            self.compression = "none"
            self._it = self._plain(first)

    def _read_raw(self) -> bytes:
        b = self._src.read(READ_SIZE)
        if b:
            if self._hash_raw:
                self.compressed_hash.update(b)
            self.compressed_size += len(b)
        return b

    def _plain(self, first: bytes) -> Iterator[bytes]:
        b = first
        while b:
            yield b
            b = self._read_raw()

    def _gzip(self, first: bytes) -> Iterator[bytes]:
        d = zlib.decompressobj(31)
        pending = first
        drain = False
        while True:
            if d.eof:
                if not pending:
                    pending = self._read_raw()
                    if not pending:
                        return
                if pending.startswith(GZIP_MAGIC) or (len(pending) == 1 and pending == b"\x1f"):
                    d = zlib.decompressobj(31)
                elif not pending.strip(b"\0"):
                    pending = b""  # zero padding after the last member (tape-style), ignored
                    continue
                else:
                    raise InvalidInput("corrupt gzip input: trailing garbage after the compressed data")
            if not pending and not drain:
                pending = self._read_raw()
                if not pending:
                    raise InvalidInput("truncated gzip input: compressed stream ends early")
            try:
                out = d.decompress(pending, OUT_MAX)
            except zlib.error as e:
                raise InvalidInput(f"corrupt gzip input: {e}") from None
            drain = len(out) == OUT_MAX
            pending = d.unused_data if d.eof else d.unconsumed_tail
            if out:
                yield out

    def _zstd(self, first: bytes) -> Iterator[bytes]:
        dctx = zstandard.ZstdDecompressor()
        d = dctx.decompressobj()
        pacer = ZstdPacer()
        started = False
        pending = memoryview(first)
        while True:
            if not pending:
                raw = self._read_raw()
                if not raw:
                    if started and not d.eof:
                        raise InvalidInput("truncated zstd input: compressed stream ends early")
                    return
                pending = memoryview(raw)
            if d.eof:
                rest = bytes(pending)
                if not rest.strip(b"\0"):
                    pending = memoryview(b"")
                    continue
                d = dctx.decompressobj()
                pacer = ZstdPacer()
            n = pacer.allowance(pending)
            if n == 0:  # a frame or block header is cut: read on before deciding
                more = self._read_raw()
                if more:
                    pending = memoryview(bytes(pending) + more)
                    continue
                n = len(pending)  # the end: the decompressor judges what is left
            piece, pending = pending[:n], pending[n:]
            started = True
            try:
                out = d.decompress(piece)
            except zstandard.ZstdError as e:
                raise InvalidInput(f"corrupt zstd input: {e}") from None
            if d.eof and d.unused_data:
                pending = memoryview(d.unused_data + bytes(pending))
            if out:
                yield out

    def next_chunk(self) -> bytes:
        """Next uncompressed chunk (b"" at the end), hashed into the diffID."""
        for b in self._it:
            self.diff_hash.update(b)
            self.size += len(b)
            return b
        return b""

    @property
    def diff_id(self) -> str:
        return "sha256:" + self.diff_hash.hexdigest()

    @property
    def compressed_digest(self) -> str | None:
        return None if self.compression == "none" else "sha256:" + self.compressed_hash.hexdigest()

    def close(self) -> None:
        self.diff_hash.close()

    def drain(self) -> None:
        """Read (and hash) the rest of the input."""
        while self.next_chunk():
            pass
