"""podman as a real client of fusesnap-overlay, for tests/clients/test_podman*.py.

A private podman set-up per mode (rootless as the unprivileged test user, or root; see
scripts/benchlib/podmanenv.py for the configuration), a rootfs built offline from
busybox-static and a few files, and readers for what a container or an image mount shows.
"""

from __future__ import annotations

import hashlib
import json
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib.ociarchive import MTIME, Entry, busybox_entries  # noqa: E402
from benchlib.podmanenv import PodmanEnv  # noqa: E402

FUSESNAP_FSTYPE = "fuse.fusesnap"      # what the kernel reports for a fusesnap-overlay mount
BASE_IMAGE = "localhost/fusesnap-base:1"
WALKER = (Path(__file__).with_name("treewalk.py")).read_text()
APPLETS = ["sh", "cat", "chmod", "chown", "cp", "echo", "find", "grep", "head", "id", "ln", "ls", "mkdir",
           "mv", "readlink", "rm", "sed", "sha256sum", "sleep", "sort", "stat", "test", "touch", "true", "wc"]


def base_entries() -> list[Entry]:
    """The imported image: busybox, and under /data the kinds of file a container changes."""
    return [
        *busybox_entries("bin", APPLETS),
        Entry("etc", "dir", mode=0o755),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n"),
        Entry("etc/group", data=b"root:x:0:\nuser:x:1000:\n"),
        Entry("root", "dir", mode=0o700),
        Entry("tmp", "dir", mode=0o1777),
        Entry("data", "dir", mode=0o755),
        Entry("data/base.txt", data=b"hello base\n"),
        Entry("data/keep.txt", data=b"keep me\n"),
        Entry("data/gone.txt", data=b"delete me\n"),
        Entry("data/owned.txt", data=b"the user's\n", mode=0o640, uid=1000, gid=1000),
        Entry("data/setuid-base", data=b"#!/bin/sh\necho setuid\n", mode=0o4755),
        Entry("data/hl1", data=b"linked twice\n"),
        Entry("data/hl2", "hardlink", target="data/hl1"),
        Entry("data/link", "symlink", target="base.txt", mode=0o777),
        Entry("data/olddir", "dir", mode=0o755),
        Entry("data/olddir/f1", data=b"one\n"),
        Entry("data/olddir/sub", "dir", mode=0o750),
        Entry("data/olddir/sub/f2", data=b"two\n"),
        Entry("data/tree", "dir", mode=0o755),
        Entry("data/tree/a", data=b"a\n"),
        Entry("data/tree/deep", "dir", mode=0o755),
        Entry("data/tree/deep/b", data=b"b\n"),
    ]


def expected_tree(entries: list[Entry]) -> dict[str, tuple]:
    """path -> (mode, uid, gid, sha256 or link target or None, nlink or None, mtime): what a
    mount of a layer holding these entries must present."""
    kinds = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK}
    out: dict[str, tuple] = {}
    links: dict[str, int] = {}
    for e in entries:
        if e.kind == "hardlink":
            links[e.target] = links.get(e.target, 1) + 1
    for e in entries:
        src = next(x for x in entries if x.path == e.target) if e.kind == "hardlink" else e
        content = hashlib.sha256(src.data).hexdigest() if src.kind == "file" else src.target or None
        nlink = None if src.kind == "dir" else links.get(src.path, 1)
        out[e.path] = (kinds[src.kind] | src.mode, src.uid, src.gid, content, nlink, MTIME)
    return out


def seen_tree(tree: dict[str, dict], paths: set[str]) -> dict[str, tuple]:
    """The same tuple from a treewalk.py description, for the given paths."""
    out = {}
    for p in paths:
        d = tree.get(p)
        if d is None:
            continue
        content = d.get("sha256") or d.get("target")
        nlink = None if stat.S_ISDIR(d["mode"]) else d["nlink"]
        out[p] = (d["mode"], d["uid"], d["gid"], content, nlink, d["mtime"])
    return out


def root_mount(mountinfo: str, mountpoint: str = "/") -> dict[str, str]:
    """The mountinfo entry of mountpoint as a process sees it (the last one mounted there)."""
    found: dict[str, str] = {}
    for line in mountinfo.splitlines():
        if " - " not in line:
            continue
        pre, post = line.split(" - ", 1)
        fields = pre.split()
        if len(fields) > 5 and fields[4] == mountpoint:
            fstype, source = post.split()[:2]
            found = {"fstype": fstype, "source": source, "device": fields[2], "options": fields[5]}
    return found


def sections(out: str) -> dict[str, str]:
    """Split a container script's output at lines "@@name" into {name: text}."""
    parts: dict[str, str] = {}
    name = ""
    for line in out.splitlines(keepends=True):
        if line.startswith("@@"):
            name = line[2:].strip()
            parts[name] = ""
        elif name:
            parts[name] += line
    return parts


# A shell fragment that prints the container's mountinfo as section "mountinfo".
SHOW_MOUNTINFO = "echo @@mountinfo; cat /proc/self/mountinfo"


def assert_fusesnap_root(out: str) -> dict[str, str]:
    """The container's root, from its own /proc/self/mountinfo, is a fusesnap-overlay mount."""
    m = root_mount(sections(out)["mountinfo"])
    assert m.get("fstype") == FUSESNAP_FSTYPE and m.get("source", "").startswith("fusesnap"), \
        f"container root is not a fusesnap mount: {m}"
    return m


@dataclass
class PodmanClient:
    """One mode ("rootless" or "root"): a podman set-up whose mount program is
    fusesnap-overlay, and a reference set-up on the kernel's overlayfs (podman's native
    overlay driver, the semantics fusesnap follows), both with the base image imported."""

    mode: str
    env: PodmanEnv
    ref: PodmanEnv
    base: Path

    def podman(self, *args: str, **kw):
        return self.env.run(*args, **kw)

    def in_mount_ns(self, script: str, *args: str, env: PodmanEnv | None = None, **kw):
        """sh -c script, where podman's mounts are visible (`podman unshare` when rootless)."""
        env = env or self.env
        prefix = ["podman", "unshare"] if env.rootless else []
        return env.command([*prefix, "sh", "-c", script, "sh", *args], **kw)

    def image_tree(self, image: str, env: PodmanEnv | None = None) -> dict:
        """`podman image mount` the image, describe the tree with treewalk.py, unmount.
        Returns {"root": mount point, "mount": its mountinfo entry, "tree": ...}."""
        script = ('py=$1 src=$2 img=$3\n'
                  'm=$(podman image mount "$img") || exit 1\n'
                  '"$py" -c "$src" "$m"; rc=$?\n'
                  'podman image umount "$img" >/dev/null || rc=1\n'
                  'exit $rc\n')
        p = self.in_mount_ns(script, sys.executable, WALKER, image, env=env)
        return json.loads(p.stdout)
