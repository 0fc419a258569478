"""Describe a mounted tree as JSON: every entry's type, mode, owner, size, content hash,
link target or device numbers, extended attributes, link count and inode, plus the
mount that holds the root.

Run as a script (`python3 -c SOURCE ROOT`) inside the mount namespace that sees the
mount: rootless podman's image mounts exist only inside `podman unshare`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys


def mount_of(path: str) -> dict[str, str]:
    """The /proc/self/mountinfo entry whose mount point is path (the last one mounted)."""
    path = os.path.realpath(path)
    found: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, post = line.split(" - ", 1)
            fields = pre.split()
            if fields[4].encode().decode("unicode_escape") == path:
                fstype, source = post.split()[:2]
                found = {"fstype": fstype, "source": source, "device": fields[2], "options": fields[5]}
    return found


def describe(path: str) -> dict[str, object]:
    st = os.lstat(path)
    d: dict[str, object] = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink,
                            "ino": st.st_ino, "mtime": st.st_mtime_ns // 10**9}
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            d["sha256"] = hashlib.sha256(f.read()).hexdigest()
        d["size"] = st.st_size
    elif stat.S_ISLNK(st.st_mode):
        d["target"] = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        d["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    names = os.listxattr(path, follow_symlinks=False)
    if names:
        d["xattrs"] = {n: os.getxattr(path, n, follow_symlinks=False).hex() for n in sorted(names)}
    return d


def walk(root: str) -> dict[str, dict[str, object]]:
    """Relative path ("." for the root) -> description, for everything below root."""
    out = {".": describe(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = describe(p)
    return out


if __name__ == "__main__":
    top = sys.argv[1]
    json.dump({"root": os.path.realpath(top), "mount": mount_of(top), "tree": walk(top)}, sys.stdout)
