"""Writing image files safely: whole files by rename, archives staged beside their target."""

from __future__ import annotations

import os
import secrets
import shutil
import tarfile
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class ArchiveStaging:
    """A directory beside an archive's path whose files `pack()` writes into the archive.

    The archive appears by rename once complete; a failed or interrupted push leaves
    the old file (if any) as it was, and close() removes the staging directory.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        parent = target.parent if str(target.parent) else Path(".")
        if not parent.is_dir():
            raise FileNotFoundError(2, "No such directory", str(parent))
        self.dir = parent / f".{target.name}.fusesnap-{secrets.token_hex(4)}"
        self.dir.mkdir(mode=0o700)

    def pack(self) -> None:
        tmp = self.dir.with_suffix(".tar")
        with tarfile.open(tmp, "w:", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(self.dir.rglob("*")):
                info = tar.gettarinfo(str(path), arcname=str(path.relative_to(self.dir)))
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o755 if info.isdir() else 0o644
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
        os.replace(tmp, self.target)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.with_suffix(".tar").unlink(missing_ok=True)
