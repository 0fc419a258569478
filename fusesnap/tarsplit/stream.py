"""A forward-only byte stream over decompressed chunks, with exact reads and zero-copy payload chunks."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..errors import InvalidInput


class ByteStream:
    """Reads from `next_chunk()` (b"" at EOF); never looks back, never copies payload data."""

    __slots__ = ("_next", "_buf", "_mv", "_pos", "_eof", "offset")

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        self._next = next_chunk
        self._buf = b""
        self._mv = memoryview(b"")
        self._pos = 0
        self._eof = False
        self.offset = 0  # bytes handed out so far

    def _fill(self) -> bool:
        while not self._eof:
            chunk = self._next()
            if not chunk:
                self._eof = True
                return False
            self._buf = chunk
            self._mv = memoryview(chunk)
            self._pos = 0
            return True
        return False

    def read_upto(self, n: int) -> bytes:
        """Up to n bytes; fewer only at end of stream."""
        avail = len(self._buf) - self._pos
        if avail >= n:
            out = self._buf[self._pos : self._pos + n]
            self._pos += n
            self.offset += n
            return out
        parts = []
        want = n
        while want:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._fill():
                    break
                continue
            take = min(avail, want)
            parts.append(self._buf[self._pos : self._pos + take])
            self._pos += take
            want -= take
        out = b"".join(parts)
        self.offset += len(out)
        return out

    def read_exact(self, n: int, what: str) -> bytes:
        out = self.read_upto(n)
        if len(out) != n:
            raise InvalidInput(f"truncated tar: unexpected end of input in {what} at offset {self.offset}")
        return out

    def chunks(self, n: int, what: str) -> Iterator[memoryview]:
        """Exactly n bytes as memoryviews into the underlying chunks (valid until the next read)."""
        while n:
            avail = len(self._buf) - self._pos
            if not avail:
                if not self._fill():
                    raise InvalidInput(f"truncated tar: unexpected end of input in {what} at offset {self.offset}")
                continue
            take = min(avail, n)
            mv = self._mv[self._pos : self._pos + take]
            self._pos += take
            self.offset += take
            n -= take
            yield mv

    def rest(self) -> Iterator[bytes]:
        """Everything left (junk after the end-of-archive blocks)."""
        if self._pos < len(self._buf):
            out = self._buf[self._pos :]
            self._pos = len(self._buf)
            self.offset += len(out)
            yield out
        while self._fill():
            out = self._buf
            self._pos = len(out)
            self.offset += len(out)
            yield out
