"""What commands write: JSON for scripts (`--json`), and `-o FILE` for commands that
write a tar (export, diff), which never replaces what FILE is.

A regular file (or a new one) is written beside it and renamed over it only
once complete, so a failed export leaves the old file intact. Anything else
that already exists is written in place (a fifo's reader gets the tar, a
device gets it as dd would) and never replaced by a regular file. A symlink is
refused, so `-o` never follows or replaces one silently; so is a directory.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from ..errors import InvalidInput


def emit_json(obj: Any) -> None:
    """One JSON document on stdout (sorted keys, anything else as its str())."""
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


@contextmanager
def output_file(path: str) -> Iterator[BinaryIO]:
    """A binary file to write the output to; on success it is at `path`, on error nothing changed
    (a special file may have received part of it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise InvalidInput(f"cannot write {path}: {e.strerror}") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise InvalidInput(f"refusing to write to {path}: it is a symbolic link (give the file it points to)")
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"cannot write to {path}: it is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise InvalidInput(f"cannot write to {path}: {e.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            yield f
        return
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.fusesnap-{os.urandom(4).hex()}")
    mode = stat.S_IMODE(st.st_mode) if st is not None else 0o666
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        raise InvalidInput(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        if st is not None:
            os.chmod(tmp, mode)  # the umask narrowed the new file: keep the old file's mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
