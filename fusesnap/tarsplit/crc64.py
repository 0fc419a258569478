"""CRC-64/ISO exactly as Go's `hash/crc64` with `crc64.ISO` (what vbatts/tar-split stores).

In the CRC catalogue this is CRC-64/GO-ISO (poly 0x1b reflected, init and xorout all
ones, check value 0xb90956c775a41001). `fastcrc` computes it at memory speed; the
pure-Python table version is the reference the tests compare against.
"""

from __future__ import annotations

import base64

try:  # pragma: no branch
    from fastcrc.crc64 import go_iso as _fast
except ImportError:  # pragma: no cover - fastcrc is a declared dependency
    _fast = None

_POLY_REFLECTED = 0xD800000000000000
_TABLE: list[int] = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY_REFLECTED if _c & 1 else _c >> 1
    _TABLE.append(_c)

MASK = 0xFFFFFFFFFFFFFFFF


def crc64_reference(data: bytes, crc: int = 0) -> int:
    """Slow, obviously-correct table implementation (Go's update(), with ^ on entry and exit)."""
    c = crc ^ MASK
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ MASK


def crc64_update(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Continue a CRC-64/ISO over `data` (crc=0 starts a new one)."""
    if _fast is not None:
        return _fast(data, crc) if crc else _fast(data)
    return crc64_reference(bytes(data), crc)


def crc_b64(crc: int) -> str:
    """tar-split's payload encoding: base64 of the 8-byte big-endian digest."""
    return base64.b64encode(crc.to_bytes(8, "big")).decode("ascii")


def crc_from_b64(s: str) -> int:
    raw = base64.b64decode(s)
    if len(raw) != 8:
        raise ValueError("CRC payload is not 8 bytes")
    return int.from_bytes(raw, "big")
