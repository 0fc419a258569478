"""Attribute records: what the view shows of an object, with no FUSE library behind them.

The core fills records of whatever class it is given: the FUSE layer passes
pyfuse3's EntryAttributes, so a reply needs no conversion; unit tests and
other callers get `Attr`. Either way the fields are os.stat_result's st_*
names plus the kernel's two cache timeouts.
"""

from __future__ import annotations

from typing import Any, Callable

ROOT_INO = 1          # the FUSE protocol's root inode number

AttrFactory = Callable[[], Any]


class Attr:
    """A plain attribute record (the core's default when no factory is given)."""

    __slots__ = ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                 "st_blocks", "st_blksize", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
                 "entry_timeout", "attr_timeout", "generation")

    def __init__(self) -> None:
        self.st_ino = self.st_mode = self.st_nlink = self.st_uid = self.st_gid = 0
        self.st_rdev = self.st_size = self.st_blocks = 0
        self.st_blksize = 4096
        self.st_atime_ns = self.st_mtime_ns = self.st_ctime_ns = 0
        self.entry_timeout = self.attr_timeout = 0.0
        self.generation = 0

    def __repr__(self) -> str:
        return (f"<Attr ino={self.st_ino} mode={self.st_mode:o} uid={self.st_uid} gid={self.st_gid} "
                f"size={self.st_size} nlink={self.st_nlink}>")
