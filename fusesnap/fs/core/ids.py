"""Owners between the host (or a layer) and the view: uidmapping/gidmapping, squash_to_*.

One place for the mapping the view applies, so that attributes, chown and the
setuid rules agree on which ids are on disk and which are presented.
"""

from __future__ import annotations

from fusesnap.fs.options import MountOptions


class IdView:
    __slots__ = ("uidmap", "gidmap", "squash_uid", "squash_gid", "plain")

    def __init__(self, opts: MountOptions) -> None:
        self.uidmap, self.gidmap = opts.uidmap, opts.gidmap
        self.squash_uid, self.squash_gid = opts.squash_uid, opts.squash_gid
        # nothing between on-disk and presented owners (the common root mount)
        self.plain = not self.uidmap and not self.gidmap and self.squash_uid is None \
            and self.squash_gid is None

    def shown_uid(self, uid: int) -> int:
        """The owner the view shows for an on-disk (or layer) owner."""
        if self.squash_uid is not None:
            return self.squash_uid
        return self.uidmap.to_presented(uid) if self.uidmap else uid

    def shown_gid(self, gid: int) -> int:
        if self.squash_gid is not None:
            return self.squash_gid
        return self.gidmap.to_presented(gid) if self.gidmap else gid

    def mapped(self, uid: int, gid: int) -> tuple[int, int]:
        """On-disk ids as the mapping presents them (squashing aside: what a chown keeps)."""
        return (self.uidmap.to_presented(uid) if self.uidmap else uid,
                self.gidmap.to_presented(gid) if self.gidmap else gid)

    def host(self, uid: int, gid: int) -> tuple[int, int]:
        """Presented ids as they go to disk."""
        return (self.uidmap.to_host(uid) if self.uidmap else uid,
                self.gidmap.to_host(gid) if self.gidmap else gid)
