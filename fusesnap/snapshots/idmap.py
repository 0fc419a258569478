"""The user namespace a snapshot was mounted in, and committing through its id mapping.

A daemon mounted inside a user namespace (`unshare --map-root-user ...`) writes
upper files whose host owners are the namespace's ids mapped outward (ns root
-> the user's own uid, ns 42 -> a subordinate id). A commit run from another
namespace reads those host ids; the layer must record the ids the mount
presented. So each mount records the mapping of the namespace it runs in, and a
commit from elsewhere maps the owners it reads back through it: its own
namespace -> the parent namespace -> the mount's namespace. Owners the daemon
could not apply live in the override xattr, already in the mount's terms.

Mappings are taken as /proc/self/{uid,gid}_map show them: relative to the parent
namespace. Both the mount's and the commit's namespaces are assumed to be
children of the same namespace (or that namespace itself), which is how
rootless tools nest them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import InvalidInput

Extent = tuple[int, int, int]  # inside, outside, count
INITIAL: tuple[Extent, ...] = ((0, 0, 4294967295),)


def _read_map(name: str) -> tuple[Extent, ...]:
    try:
        with open(f"/proc/self/{name}") as f:
            out = []
            for line in f:
                a, b, c = line.split()
                out.append((int(a), int(b), int(c)))
            return tuple(out)
    except (OSError, ValueError):
        return INITIAL


def _userns() -> int:
    try:
        return os.stat("/proc/self/ns/user").st_ino
    except OSError:
        return 0


@dataclass(frozen=True)
class IdMap:
    userns: int
    uid: tuple[Extent, ...]
    gid: tuple[Extent, ...]

    @classmethod
    def current(cls) -> "IdMap":
        return cls(_userns(), _read_map("uid_map"), _read_map("gid_map"))

    def to_json(self) -> str:
        return json.dumps({"userns": self.userns, "uid": self.uid, "gid": self.gid}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "IdMap":
        d = json.loads(text)
        return cls(int(d["userns"]), tuple(tuple(e) for e in d["uid"]), tuple(tuple(e) for e in d["gid"]))

    def is_initial(self) -> bool:
        """The initial user namespace (the host's): every id maps to itself."""
        return self.uid == INITIAL and self.gid == INITIAL

    def same_mapping(self, other: "IdMap") -> bool:
        return self.uid == other.uid and self.gid == other.gid


def _outward(extents: tuple[Extent, ...], i: int) -> int | None:
    for inside, outside, count in extents:
        if inside <= i < inside + count:
            return outside + (i - inside)
    return None


def _inward(extents: tuple[Extent, ...], o: int) -> int | None:
    for inside, outside, count in extents:
        if outside <= o < outside + count:
            return inside + (o - outside)
    return None


class IdTranslation:
    """Maps owners read in this process's namespace to the ids the mount presented."""

    def __init__(self, mount: IdMap, me: IdMap) -> None:
        self.mount = mount
        self.me = me

    def owner(self, uid: int, gid: int, what: str) -> tuple[int, int]:
        return self._one(uid, self.me.uid, self.mount.uid, "uid", what), \
            self._one(gid, self.me.gid, self.mount.gid, "gid", what)

    @staticmethod
    def _one(i: int, mine: tuple[Extent, ...], theirs: tuple[Extent, ...], kind: str, what: str) -> int:
        outer = _outward(mine, i)
        inner = _inward(theirs, outer) if outer is not None else None
        if inner is None:
            raise InvalidInput(f"cannot commit {what}: its owner ({kind} {i} here) has no {kind} in the user"
                               " namespace the snapshot was mounted in; commit it from inside that namespace")
        return inner


def translation_for(recorded: str | None) -> IdTranslation | None:
    """How a commit in this process maps upper owners, given the mapping the snapshot was
    mounted with (None: no translation needed)."""
    if not recorded:
        return None
    mount = IdMap.from_json(recorded)
    me = IdMap.current()
    if mount.userns == me.userns or mount.same_mapping(me):
        return None
    return IdTranslation(mount, me)
