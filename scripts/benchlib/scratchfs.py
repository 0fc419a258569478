"""The filesystem the writable workloads write to: a fresh ext4 made for one run.

Uppers, the store's snapshots and untar's output land in the run's scratch
directory. On the host filesystem their speed depends on what earlier runs
left behind: a journal-less ext4 (this VM's root) skips recently deleted
inodes on every allocation for minutes after an `rm -rf`, which moved the
plain directory's create from 0.4 to 3.2 s and its untar from 0.4 to 5.5 s
between the repetitions of one run. A new journaled ext4 for the whole run
(sparse image under --cache, loop-mounted, its inode tables left to the
zeroes of the sparse file instead of a background thread) gives every target
the same fresh, well-behaved filesystem.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from benchlib.runner import log
from benchlib.sysutil import BenchError, is_root, run, unmount

IMAGE_BYTES = 64 << 30      # sparse: the store, a 2 GiB copy-up and untar fit many times over
CHOICES = ("ext4", "host")


def default_choice() -> str:
    return "ext4" if is_root() and shutil.which("mkfs.ext4") else "host"


@contextlib.contextmanager
def scratch_fs(kind: str | None, scratch: Path) -> Iterator[str]:
    """Mount a fresh ext4 on the (empty) directory scratch for the duration; yield a
    description for the report. kind "host" leaves scratch on the host filesystem;
    None: ext4 where it can be made (root, mkfs.ext4, a loop device), else the host."""
    fallback = kind is None
    kind = kind or default_choice()
    if kind == "host":
        yield "host filesystem under --cache"
        return
    if not is_root():
        raise BenchError("--scratch-fs ext4 needs root (loop mount); use --scratch-fs host")
    image = scratch.with_name(scratch.name + ".img")
    with contextlib.suppress(FileNotFoundError):
        image.unlink()
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    try:
        try:
            run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(image)], timeout=300)
            run(["mount", "-o", "loop,noinit_itable", str(image), str(scratch)], timeout=60)
        except BenchError as e:
            if not fallback:
                raise
            log(f"no fresh ext4 for the writable workloads ({e}); they write to the host filesystem")
            yield "host filesystem under --cache (a fresh ext4 could not be made)"
            return
        try:
            os.chmod(scratch, 0o755)
            yield f"fresh ext4 ({IMAGE_BYTES >> 30} GiB sparse image, loop-mounted)"
        finally:
            unmount(scratch)
    finally:
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
