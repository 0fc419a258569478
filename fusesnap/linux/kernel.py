"""Facts about the running kernel and this process's namespaces, read from /proc and uname."""

from __future__ import annotations

import os


def in_initial_user_namespace() -> bool:
    """Whether this process sees every uid unmapped, as only the initial user namespace does."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def release_at_least(major: int, minor: int) -> bool:
    """Whether the running kernel's release is major.minor or newer."""
    try:
        have = tuple(int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return have >= (major, minor)
