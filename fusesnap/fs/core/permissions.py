"""Who may do what in the view: one rule for open, create, chmod and access.

Mounts made by root, and rootless mounts other users may enter (allow_other),
let the kernel check every access against the presented attributes
(default_permissions). A rootless mount only its user can enter makes that
user root of the view, as kernel overlayfs in the user's namespace would: it
may read, write, chown and chmod anything the daemon itself can reach (it owns
every host object of the store and the upper anyway, so no boundary is
crossed). The daemon then answers ACCESS by the same rule, so `test -w` agrees
with what an open for writing does; and it keeps its own host objects readable
and writable (fs/core/ownership.py), so root of the view reaches a file whose
presented mode is 000 as root would.
"""

from __future__ import annotations

import os
import stat as S
from typing import Callable, Iterable

X_OK = os.X_OK


def root_may(mode: int, mask: int) -> bool:
    """What root may: read and write anything, execute what has an execute bit (or search a dir)."""
    return not (mask & X_OK) or bool(mode & 0o111) or S.S_ISDIR(mode)


def owner_group_other_may(mode: int, uid: int, gid: int, mask: int, caller_uid: int, caller_gid: int,
                          groups: Callable[[], Iterable[int]]) -> bool:
    """The classic check of one caller against mode, owner and group (no capabilities)."""
    if caller_uid == uid:
        bits = (mode >> 6) & 7
    elif caller_gid == gid or gid in groups():
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return (mask & bits) == mask


class Permissions:
    """The rule for a daemon that answers ACCESS itself (no default_permissions)."""

    __slots__ = ("kernel_checks", "mount_owner")

    def __init__(self, euid: int, allow_other: bool, asked: bool) -> None:
        # the kernel checks (default_permissions): as root, when others may enter, or asked
        self.kernel_checks = euid == 0 or allow_other or asked
        self.mount_owner = euid

    def acts_as_root(self, caller_uid: int) -> bool:
        """Whether this caller is root of the view (the user of a private rootless mount)."""
        return not self.kernel_checks and caller_uid == self.mount_owner

    def may(self, mode: int, uid: int, gid: int, mask: int, caller_uid: int, caller_gid: int,
            groups: Callable[[], Iterable[int]]) -> bool:
        """access(2) of presented mode/uid/gid for a caller."""
        if caller_uid == 0 or self.acts_as_root(caller_uid):
            return root_may(mode, mask)
        return owner_group_other_may(mode, uid, gid, mask, caller_uid, caller_gid, groups)
