"""A directory's entries with offsets that stay valid for the life of the mount.

Readdir is served by inode, not by an open handle (the kernel opens directories
itself), so any offset ever handed out may come back.
"""

from __future__ import annotations

import bisect

from fusesnap.fs.core.inodes import Inode


class Listing:
    """A directory's entries in a fixed order, each with a cookie that never changes.

    Entries are only appended (by ``sync``); a removed or replaced entry stays
    in place, dead, and readers skip it (``kids.get(name) is not inode``), so a
    reader resuming at any cookie neither skips nor repeats live entries. When
    dead slots outnumber live ones they are dropped; cookies are kept, so from
    then on they are looked up by bisection instead of used as indexes."""

    __slots__ = ("d", "ents", "cookies", "next", "seen")

    def __init__(self, d: Inode, kids: dict[bytes, Inode]) -> None:
        self.d = d
        self.ents: list[tuple[bytes, Inode]] = list(kids.items())
        self.cookies: list[int] | None = None    # None: cookie == index
        self.next = len(self.ents)
        self.seen = dict(kids)                   # the entries as of the last sync

    def sync(self, kids: dict[bytes, Inode]) -> None:
        # Unchanged since the last sync (every re-read of an untouched directory):
        # nothing to append and no compaction due, so skip building the pair set.
        # (Inode has no __eq__: the comparison is by identity, in C.)
        if kids == self.seen:
            return
        self.seen = dict(kids)
        have = set(self.ents)
        new = [kv for kv in kids.items() if kv not in have]
        if len(self.ents) + len(new) > 2 * len(kids) + 64:
            live = [(c, kv) for c, kv in zip(self.cookies or range(len(self.ents)), self.ents)
                    if kids.get(kv[0]) is kv[1]]
            self.cookies = [c for c, _ in live]
            self.ents = [kv for _, kv in live]
        self.ents.extend(new)
        if self.cookies is not None:
            self.cookies.extend(range(self.next, self.next + len(new)))
        self.next += len(new)

    def index(self, cookie: int) -> int:
        """Position of the first entry whose cookie is >= ``cookie``."""
        if self.cookies is None:
            return cookie
        return bisect.bisect_left(self.cookies, cookie)
