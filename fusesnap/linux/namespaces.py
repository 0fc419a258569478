"""Which namespaces this process lives in, read from /proc/self.

Stdlib `os` only (no other import): the mount command's start-up path uses it
before anything heavy is loaded.
"""

from __future__ import annotations

import os

_FULL_MAP = ["0", "0", "4294967295"]


def in_initial_user_namespace() -> bool:
    """Whether this process sees every uid unmapped, as only the initial user namespace does."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == _FULL_MAP
    except OSError:
        return False


def root_of_a_user_namespace() -> bool:
    """Root inside a user namespace other than the initial one (rootless podman's
    mount program, `unshare -Ur`): what it mounts the kernel confines to that
    namespace (allow_other admits only its processes, setuid reaches only its ids,
    device nodes are ignored)."""
    return os.geteuid() == 0 and not in_initial_user_namespace()
