"""Small layer tars built in memory for tests: one call per member."""

from __future__ import annotations

import io
import tarfile

T = 1_700_000_000       # a fixed mtime, so that tars (and their digests) repeat


class TarBuilder:
    """`add()` members in order, then `data()`: a PAX tar's bytes."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._tf = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name: str, data: bytes | None = None, mode: int = 0o644, uid: int = 0, gid: int = 0,
            kind: bytes | None = None, link: str = "", mtime: int = T,
            pax: dict[str, str] | None = None, dev: tuple[int, int] = (0, 0)) -> "TarBuilder":
        """A regular file (data), a directory (no data, no kind), or any other kind
        (tarfile.SYMTYPE, LNKTYPE, CHRTYPE... with link or dev)."""
        ti = tarfile.TarInfo(name)
        ti.mode, ti.uid, ti.gid, ti.mtime = mode, uid, gid, mtime
        if pax:
            ti.pax_headers = dict(pax)
        if kind is not None:
            ti.type, ti.linkname = kind, link
            ti.devmajor, ti.devminor = dev
            self._tf.addfile(ti)
        elif data is None:
            ti.type = tarfile.DIRTYPE
            self._tf.addfile(ti)
        else:
            ti.size = len(data)
            self._tf.addfile(ti, io.BytesIO(data))
        return self

    def data(self) -> bytes:
        self._tf.close()
        return self._buf.getvalue()
