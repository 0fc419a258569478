"""Read access to the files of an image on disk: a directory, or the members of a tar archive.

An OCI layout reads the same through both (`oci:DIR` and `oci-archive:FILE`);
a docker-archive is always a tar. Names are looked up, never joined into host
paths from archive content, so `../` in a manifest cannot reach outside.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from pathlib import Path
from typing import BinaryIO, Protocol

from ..errors import InvalidInput, NotFound

MAX_JSON = 16 << 20  # manifests, indexes and configs are small; refuse to slurp a huge member


class Files(Protocol):
    where: str

    def exists(self, name: str) -> bool: ...
    def open(self, name: str) -> BinaryIO: ...
    def size(self, name: str) -> int: ...
    def close(self) -> None: ...


def read_small(files: Files, name: str) -> bytes:
    if files.size(name) > MAX_JSON:
        raise InvalidInput(f"{files.where}: {name} is larger than {MAX_JSON >> 20} MiB")
    with files.open(name) as f:
        return f.read()


def _clean(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidInput(f"refusing the path {name!r}: it leaves the image")
    return "/".join(parts)


class DirFiles:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)
        if not root.is_dir():
            raise NotFound(f"{root} is not a directory")

    def _path(self, name: str) -> Path:
        return self.root / _clean(name)

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def open(self, name: str) -> BinaryIO:
        try:
            return open(self._path(name), "rb")
        except FileNotFoundError:
            raise NotFound(f"{self.where}: {name} is missing") from None

    def size(self, name: str) -> int:
        try:
            return os.stat(self._path(name)).st_size
        except FileNotFoundError:
            raise NotFound(f"{self.where}: {name} is missing") from None

    def close(self) -> None:
        pass


class TarFiles:
    """Members of a plain tar by name (headers scanned once; payloads read in place)."""

    def __init__(self, path: Path) -> None:
        self.where = str(path)
        try:
            self._tar = tarfile.open(path, "r:")
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None
        except IsADirectoryError:
            raise InvalidInput(f"{path} is a directory, not an archive (use oci:{path} for a layout)") from None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise InvalidInput(f"corrupt archive {path}: {e}") from None
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            for m in self._tar:
                if m.isreg() or m.islnk() or m.issym():
                    self._members[_clean(m.name)] = m
        except (tarfile.TarError, OSError, EOFError) as e:
            self._tar.close()
            raise InvalidInput(f"corrupt archive {path}: {e}") from None

    def _member(self, name: str) -> tarfile.TarInfo:
        """The regular-file member `name` stands for, following (a few) links inside the archive."""
        for _ in range(8):
            try:
                m = self._members[_clean(name)]
            except KeyError:
                raise NotFound(f"{self.where}: {name} is missing from the archive") from None
            if m.isreg():
                return m
            name = m.linkname if m.islnk() else posixpath.join(posixpath.dirname(m.name), m.linkname)
        raise InvalidInput(f"corrupt archive {self.where}: too many links at {name}")

    def exists(self, name: str) -> bool:
        return _clean(name) in self._members

    def open(self, name: str) -> BinaryIO:
        m = self._member(name)
        try:
            f = self._tar.extractfile(m)
        except (tarfile.TarError, KeyError) as e:
            raise InvalidInput(f"corrupt archive {self.where}: {name}: {e}") from None
        if f is None:
            raise InvalidInput(f"corrupt archive {self.where}: {name} is not a file")
        return f  # type: ignore[return-value]

    def size(self, name: str) -> int:
        return self._member(name).size

    def close(self) -> None:
        self._tar.close()
