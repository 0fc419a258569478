"""podman with fusesnap-overlay as the overlay driver's mount_program, set up as a user
would (README "Use with podman"): rootless as the unprivileged test user, and as root.

Each mode gets one private podman set-up (its own graphroot, runroot and configuration)
and one imported image for the whole module. Every test reads the container's own
/proc/self/mountinfo (or, for an image mount, the mount namespace's) to make sure its
root really is a fusesnap mount, and compares what podman shows with what went in, or
with what the same podman shows on the kernel's overlayfs (its native overlay driver, in
a second set-up: the semantics fusesnap follows).

What differs by design between the two: with a mount program, containers/storage
computes a layer by comparing the container's tree with its parent's ("naive diff":
mode, owner, size and mtime, not ctime), with the kernel it reads the upper directory.
So a new hard link to an otherwise unchanged lower file becomes a copy in the layer
(fuse-overlayfs gives the same), and the layers themselves differ (per-file whiteouts
instead of opaque markers). The tests compare merged trees, not layer bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest

from fusesnap.cli.launcher import kept
from helpers import is_root, script
from podmanclient import (BASE_IMAGE, FUSESNAP_FSTYPE, SHOW_MOUNTINFO, PodmanClient, assert_fusesnap_root,
                          base_entries, expected_tree, root_mount, sections, seen_tree)
from benchlib.ociarchive import BUSYBOX, Entry, layer_tar, write_oci_archive
from benchlib.podmanenv import PodmanEnv, missing_tools, processes_naming

pytestmark = [pytest.mark.rootless, pytest.mark.skipif(not is_root(), reason="sets up podman and its user; needs root")]

MODES = ["rootless", "root"]


@pytest.fixture(scope="module", params=MODES)
def pm(request) -> PodmanClient:
    rootless = request.param == "rootless"
    missing = missing_tools(rootless)
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (scripts/setup installs them)")
    user = request.getfixturevalue("test_user") if rootless else None
    base = Path(tempfile.mkdtemp(prefix=f"fusesnap-podman-{request.param}-", dir="/var/tmp"))
    os.chmod(base, 0o711)
    env = PodmanEnv(base / "env", script("fusesnap-overlay"), user)
    ref = PodmanEnv(base / "ref", None, user)
    try:
        rootfs = base / "rootfs.tar"
        rootfs.write_bytes(layer_tar(base_entries()))
        os.chmod(rootfs, 0o644)
        for e in (env, ref):
            e.create()
            e.run("import", str(rootfs), BASE_IMAGE)
        yield PodmanClient(request.param, env, ref, base)
    finally:
        for e in (env, ref):
            e.close()
        shutil.rmtree(base, ignore_errors=True)


def container_tree(out: str) -> dict[str, tuple]:
    """Parse LIST_TREE's section "tree" into expected_tree's tuples."""
    tree = {}
    for line in sections(out)["tree"].splitlines():
        path, mode, uid, gid, nlink, mtime, content = line.split("|")
        m = int(mode, 16)
        tree[path.lstrip("/")] = (m, int(uid), int(gid), content or None, None if stat.S_ISDIR(m) else int(nlink),
                                  int(mtime))
    return tree


# Every entry below the given roots: mode (hex), owner, links, mtime, and content hash or link target.
LIST_TREE = r"""echo @@tree
find "$@" | while read -r p; do
  c=
  if [ -L "$p" ]; then c=$(readlink "$p"); elif [ -f "$p" ]; then set -- $(sha256sum "$p"); c=$1; fi
  echo "$p|$(stat -c '%f|%u|%g|%h|%Y' "$p")|$c"
done
"""


def test_import_presents_every_entry(pm):
    """`podman import` keeps the tar as the layer, and a container sees every entry of it
    as the tar has it: type, mode (setuid too), owner, content, links, mtime."""
    rootfs = (pm.base / "rootfs.tar").read_bytes()
    layers = json.loads(pm.podman("image", "inspect", "--format", "{{json .RootFS.Layers}}", BASE_IMAGE).stdout)
    assert layers == ["sha256:" + hashlib.sha256(rootfs).hexdigest()]
    roots = ["/bin", "/etc/passwd", "/etc/group", "/root", "/tmp", "/data"]
    p = pm.podman("run", "--rm", BASE_IMAGE, "sh", "-c", f"{SHOW_MOUNTINFO}; {LIST_TREE}", "sh", *roots)
    assert_fusesnap_root(p.stdout)
    seen = container_tree(p.stdout)
    want = expected_tree(base_entries())
    want = {k: v for k, v in want.items() if k != "etc"}
    assert seen == want


RUN_CHANGES = r"""set -e
echo @@read; cat /data/base.txt
echo more >> /data/base.txt
echo @@written; cat /data/base.txt
echo @@through-link; cat /data/link
echo new > /data/new.txt
rm /data/gone.txt
echo @@gone; test -e /data/gone.txt && echo present || echo absent
mv /data/olddir /data/newdir
echo @@renamed; find /data/newdir | sort; cat /data/newdir/f1 /data/newdir/sub/f2; stat -c '%a' /data/newdir/sub
echo @@olddir; test -e /data/olddir && echo present || echo absent
echo @@listing; ls -a /data | sort
echo @@meta; stat -c '%n %a %u %g %h' /data/owned.txt /data/setuid-base /data/hl1 /data/hl2
echo @@inodes; stat -c '%i' /data/hl1 /data/hl2
echo hl >> /data/hl2
echo @@hardlink-write; cat /data/hl1
"""


def test_run_reads_writes_deletes_and_renames_base_entries(pm):
    p = pm.podman("run", "--rm", BASE_IMAGE, "sh", "-c", f"{SHOW_MOUNTINFO}; {RUN_CHANGES}")
    assert_fusesnap_root(p.stdout)
    s = sections(p.stdout)
    assert s["read"] == "hello base\n"
    assert s["written"] == s["through-link"] == "hello base\nmore\n"
    assert s["gone"] == "absent\n" and s["olddir"] == "absent\n"
    assert s["renamed"] == ("/data/newdir\n/data/newdir/f1\n/data/newdir/sub\n/data/newdir/sub/f2\n"
                            "one\ntwo\n750\n")
    assert s["listing"].split() == [".", "..", "base.txt", "hl1", "hl2", "keep.txt", "link", "new.txt", "newdir",
                                    "owned.txt", "setuid-base", "tree"]
    assert s["meta"].splitlines() == ["/data/owned.txt 640 1000 1000 1", "/data/setuid-base 4755 0 0 1",
                                      "/data/hl1 644 0 0 2", "/data/hl2 644 0 0 2"]
    a, b = s["inodes"].split()
    assert a == b
    assert s["hardlink-write"] == "linked twice\nhl\n"   # both names are still one file after copy-up
    # --rm: the next container starts from the unchanged image
    p = pm.podman("run", "--rm", BASE_IMAGE, "sh", "-c", f"{SHOW_MOUNTINFO}; echo @@after; cat /data/base.txt; ls /data")
    assert_fusesnap_root(p.stdout)
    assert sections(p.stdout)["after"].split() == ["hello", "base", "base.txt", "gone.txt", "hl1", "hl2", "keep.txt",
                                                   "link", "olddir", "owned.txt", "setuid-base", "tree"]


CONTAINERFILE = f"""FROM {BASE_IMAGE}
RUN grep ' / / ' /proc/self/mountinfo > /root-mount.txt
RUN rm /data/gone.txt /data/hl2 && rm -r /data/olddir/sub && echo new > /data/new.txt
RUN rm -rf /data/tree && mkdir /data/tree && echo only > /data/tree/only
RUN echo linked > /data/a && ln /data/a /data/b
RUN cp /bin/busybox /data/suid && chmod 4755 /data/suid && chmod 2775 /data/tree && chown 1000:1000 /data/a
RUN mv /data/olddir /data/newdir && echo appended >> /data/base.txt && ln -s newdir/f1 /data/f1-link
WORKDIR /work/here
COPY src/ /copied/
ADD added.tar /added/
USER 1000
RUN echo as-user > /tmp/as-user && (touch /work/here/no 2>/dev/null || echo refused > /tmp/refused)
"""
ADDED_TAR = [Entry("x", "dir", mode=0o750), Entry("x/f", data=b"f\n", mode=0o4755), Entry("x/h", "hardlink", target="x/f", mode=0o4755),
             Entry("x/l", "symlink", target="f", mode=0o777), Entry("x/owned", data=b"o\n", uid=1000, gid=1000)]


def comparable(tree: dict[str, dict]) -> dict[str, tuple]:
    """A tree without what differs between two builds or two drivers: times, inode
    numbers, link counts (compared where they matter by the tests themselves)."""
    return {p: (d["mode"], d["uid"], d["gid"], d.get("sha256") or d.get("target") or d.get("rdev"), d.get("xattrs"))
            for p, d in tree.items() if p != "root-mount.txt"}


def test_build(pm):
    """A multi-step build (deletes, an opaque directory, a hard link, a setuid file, a
    renamed lower directory, WORKDIR, COPY, ADD of a tar, a RUN as another user) gives
    the image tree the kernel's overlayfs gives."""
    ctx = pm.base / "ctx"
    (ctx / "src" / "sub").mkdir(parents=True)
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    (ctx / "src" / "c1").write_text("c1\n")
    (ctx / "src" / "sub" / "c2").write_text("c2\n")
    (ctx / "added.tar").write_bytes(layer_tar(ADDED_TAR))
    for d, _, files in os.walk(ctx):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    image = "localhost/fusesnap-built:1"
    build = ["build", "--no-cache", "--network", "none", "-t", image, str(ctx)]
    pm.podman(*build, timeout=600)
    pm.ref.run(*build, timeout=600)

    # the RUN steps' root was a fusesnap mount (the first step wrote down what it saw)
    p = pm.podman("run", "--rm", image, "sh", "-c", f"{SHOW_MOUNTINFO}; echo @@build; cat /root-mount.txt")
    assert_fusesnap_root(p.stdout)
    assert root_mount(sections(p.stdout)["build"])["fstype"] == FUSESNAP_FSTYPE

    ours = pm.image_tree(image)
    assert ours["mount"]["fstype"] == FUSESNAP_FSTYPE
    t = ours["tree"]
    assert "data/gone.txt" not in t and "data/hl2" not in t and "data/olddir" not in t
    assert sorted(p for p in t if p.startswith("data/tree/")) == ["data/tree/only"]
    assert stat.S_IMODE(t["data/tree"]["mode"]) == 0o2775
    assert t["data/a"]["ino"] == t["data/b"]["ino"] and t["data/a"]["nlink"] == 2
    assert (t["data/a"]["uid"], t["data/a"]["gid"]) == (1000, 1000)
    assert t["data/suid"]["mode"] == stat.S_IFREG | 0o4755
    assert t["data/suid"]["sha256"] == hashlib.sha256(Path(BUSYBOX).read_bytes()).hexdigest()
    assert sorted(p for p in t if p.startswith("data/newdir")) == ["data/newdir", "data/newdir/f1"]
    assert t["data/base.txt"]["sha256"] == hashlib.sha256(b"hello base\nappended\n").hexdigest()
    assert t["data/f1-link"]["target"] == "newdir/f1"
    assert "work/here/no" not in t and t["tmp/refused"]["uid"] == 1000 and t["tmp/as-user"]["uid"] == 1000
    assert t["added/x/f"]["mode"] == stat.S_IFREG | 0o4755 and t["added/x/f"]["ino"] == t["added/x/h"]["ino"]
    assert (t["added/x/owned"]["uid"], t["copied/sub/c2"]["sha256"]) == (1000, hashlib.sha256(b"c2\n").hexdigest())
    # The kernel (without index=on) breaks the hard link when the chown copies data/a up,
    # so its data/b keeps the old owner; fusesnap keeps hard-link groups across copy-up.
    kernel = comparable(pm.image_tree(image, pm.ref)["tree"])
    assert kernel.pop("data/b")[1:3] == (0, 0)
    assert comparable(t) == {**kernel, "data/b": kernel["data/a"]}


COMMIT_CHANGES = """set -e
echo changed >> /data/base.txt
rm /data/gone.txt
mv /data/olddir /data/newdir
mkdir /data/made && echo m > /data/made/m
rm -r /data/tree/deep
chmod 600 /data/owned.txt
"""


def data_changes(diff: dict) -> dict[str, list[str]]:
    """`podman diff --format json` limited to /data (podman itself adds /etc and /run files)."""
    return {k: sorted(p for p in v if p.startswith("/data")) for k, v in diff.items()}


def test_commit_and_diff(pm):
    """`podman diff` of a stopped container and `podman commit` of it list and keep what
    they do on the kernel's overlayfs."""
    for env in (pm.env, pm.ref):
        p = env.run("run", "--name", "changed", BASE_IMAGE, "sh", "-c", f"{SHOW_MOUNTINFO}; {COMMIT_CHANGES}")
        if env is pm.env:
            assert_fusesnap_root(p.stdout)
    diffs = [data_changes(json.loads(env.run("diff", "--format", "json", "changed").stdout))
             for env in (pm.env, pm.ref)]
    assert diffs[0] == diffs[1]
    assert diffs[0]["deleted"] == ["/data/gone.txt", "/data/olddir", "/data/tree/deep"]
    assert diffs[0]["added"] == ["/data/made", "/data/made/m", "/data/newdir", "/data/newdir/f1",
                                 "/data/newdir/sub", "/data/newdir/sub/f2"]
    assert {"/data/base.txt", "/data/owned.txt"} <= set(diffs[0]["changed"])

    image = "localhost/fusesnap-committed:1"
    for env in (pm.env, pm.ref):
        env.run("commit", "changed", image)
        env.run("rm", "changed")
    p = pm.podman("run", "--rm", image, "sh", "-c",
                  f"{SHOW_MOUNTINFO}; echo @@base; cat /data/base.txt; echo @@ls; ls /data /data/tree; "
                  "echo @@owned; stat -c %a /data/owned.txt")
    assert_fusesnap_root(p.stdout)
    s = sections(p.stdout)
    assert s["base"] == "hello base\nchanged\n" and s["owned"] == "600\n"
    listing = s["ls"].split()
    assert "gone.txt" not in listing and "deep" not in listing and "newdir" in listing and "made" in listing
    ours = pm.image_tree(image)
    assert ours["mount"]["fstype"] == FUSESNAP_FSTYPE
    assert comparable(ours["tree"]) == comparable(pm.image_tree(image, pm.ref)["tree"])
    # the committed layer, as `podman diff IMAGE` tells it
    assert data_changes(json.loads(pm.podman("diff", "--format", "json", image).stdout)) == diffs[0]


def wait_gone(path: str, timeout: float = 15) -> list[int]:
    """Wait until no process names path (a mount's daemon exits when it is unmounted)."""
    deadline = time.monotonic() + timeout
    while (left := processes_naming(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_image_mount_presents_the_image(pm):
    """`podman image mount` (read-only, no upper) shows the imported tar exactly; the
    daemon goes away with `podman image umount`."""
    seen = pm.image_tree(BASE_IMAGE)
    assert seen["mount"]["fstype"] == FUSESNAP_FSTYPE and seen["mount"]["source"].startswith("fusesnap")
    want = expected_tree(base_entries())
    assert seen_tree(seen["tree"], set(want)) == want
    assert set(seen["tree"]) == set(want) | {"."}
    assert wait_gone(seen["root"]) == []
    assert seen["root"] not in pm.in_mount_ns("cat /proc/self/mountinfo").stdout


def test_two_containers_at_once(pm):
    """Two running containers of one image: two fusesnap mounts, each with its own
    upper; removing the containers unmounts them and ends their daemons."""
    names = ["first", "second"]
    for n in names:
        pm.podman("run", "-d", "--name", n, BASE_IMAGE, "sleep", "600")
    try:
        merged = {n: pm.podman("inspect", "--format", "{{.GraphDriver.Data.MergedDir}}", n).stdout.strip()
                  for n in names}
        devices = set()
        for n in names:
            p = pm.podman("exec", n, "sh", "-c", f"{SHOW_MOUNTINFO}; echo {n} > /data/base.txt; rm /data/keep.txt")
            devices.add(assert_fusesnap_root(p.stdout)["device"])
        assert len(devices) == 2
        for n in names:
            listing = pm.podman("exec", n, "sh", "-c", "cat /data/base.txt; ls /data").stdout.split()
            assert listing[0] == n and "keep.txt" not in listing and "gone.txt" in listing
            daemons = processes_naming(merged[n])
            assert len(daemons) == 1, (n, daemons)
            argv = [a.decode() for a in Path(f"/proc/{daemons[0]}/cmdline").read_bytes().split(b"\0")]
            # the command podman ran (the launcher), or its console script where the
            # launcher fell back on it (no mount server yet in podman's context)
            assert argv[1] in (script("fusesnap-overlay"), str(kept(Path(script("fusesnap-overlay"))))), argv
    finally:
        pm.podman("rm", "--force", "--time", "0", *names)
    for n in names:
        assert wait_gone(merged[n]) == [], f"{n}: daemon still running after podman rm"
    mounted = pm.in_mount_ns("cat /proc/self/mountinfo").stdout
    assert not any(m in mounted for m in merged.values())


CAP_NET_BIND_SERVICE = bytes.fromhex("0100000200040000" + "00" * 12)   # vfs_cap_data v2, permitted


def test_loaded_image_with_whiteouts_and_opaque_dir(pm):
    """A two-layer image from `podman load` (an OCI archive built offline): the upper
    layer's whiteouts and opaque directory, as containers/storage stored them, hide what
    they must; its extended attributes (a file capability among them) and, as root, a
    device node come through; all as on the kernel's overlayfs."""
    entries = [
        Entry("data", "dir", mode=0o755),
        Entry("data/.wh.gone.txt"),
        Entry("data/tree", "dir", mode=0o755),
        Entry("data/tree/.wh..wh..opq"),
        Entry("data/tree/new", data=b"new\n"),
        Entry("data/olddir", "dir", mode=0o755),
        Entry("data/olddir/.wh.sub"),
        Entry("data/added.txt", data=b"added\n", mode=0o600, uid=1000, gid=1000),
        Entry("data/capable", data=b"#!/bin/sh\n", mode=0o755,
              xattrs={"security.capability": CAP_NET_BIND_SERVICE, "user.note": b"kept"}),
    ]
    if not pm.env.rootless:   # a user namespace cannot make device nodes
        entries.append(Entry("data/null", "chr", mode=0o666, rdev=(1, 3)))
    archive = pm.base / "layered.tar"
    image = "localhost/fusesnap-layered:1"
    write_oci_archive(archive, [pm.base / "rootfs.tar", layer_tar(entries)], image)
    os.chmod(archive, 0o644)
    for env in (pm.env, pm.ref):
        env.run("load", "-i", str(archive))
    p = pm.podman("run", "--rm", image, "sh", "-c",
                  f"{SHOW_MOUNTINFO}; echo @@data; ls -a /data; echo @@tree; ls -aR /data/tree; "
                  "echo @@olddir; ls -a /data/olddir; echo @@added; stat -c '%a %u %g' /data/added.txt")
    assert_fusesnap_root(p.stdout)
    s = sections(p.stdout)
    want = [".", "..", "added.txt", "base.txt", "capable", "hl1", "hl2", "keep.txt", "link", "olddir", "owned.txt",
            "setuid-base", "tree"]
    assert sorted(s["data"].split()) == sorted(want + ([] if pm.env.rootless else ["null"]))
    assert s["tree"].split() == ["/data/tree:", ".", "..", "new"]
    assert s["olddir"].split() == [".", "..", "f1"]
    assert s["added"] == "600 1000 1000\n"
    t = pm.image_tree(image)["tree"]
    assert not any(".wh." in p for p in t)
    assert t["data/capable"]["xattrs"] == {"security.capability": CAP_NET_BIND_SERVICE.hex(), "user.note": b"kept".hex()}
    if not pm.env.rootless:
        assert stat.S_ISCHR(t["data/null"]["mode"]) and t["data/null"]["rdev"] == [1, 3]
    assert comparable(t) == comparable(pm.image_tree(image, pm.ref)["tree"])
