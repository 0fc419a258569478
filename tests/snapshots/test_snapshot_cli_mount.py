"""`fusesnap mount/umount` from the command line, as root and as an unprivileged user.

mount returns only once the mount is live; -f stays in the foreground; the
daemon goes away after `fusesnap umount` or `fusermount3 -u`. Rootless: layer
files on the host belong to the user who imported them, yet the mount shows
the tar's owners and modes, and commit records what the mount presented.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from helpers import is_mounted, run_as, script, unmount, user_env, wait_mounted

T = 1_600_000_000


def fusesnap(root: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([script("fusesnap"), "--root", str(root), *args], capture_output=True, **kw)


def daemons_for(mp: Path) -> list[int]:
    """PIDs of processes whose command line mounts mp (the forked daemon keeps the CLI's argv)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mount" in argv and os.fsencode(str(mp)) in argv:
            pids.append(int(d))
    return pids


def wait_gone(pids: list[int], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() and b"Z" not in _state(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return b"Z"


def image_tar(user_uid: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name, data=None, mode=0o644, uid=0, gid=0, kind=None, link=""):
            ti = tarfile.TarInfo(name)
            ti.mode, ti.mtime, ti.uid, ti.gid = mode, T, uid, gid
            if name == "etc/hosts":
                ti.pax_headers = {"SCHILY.xattr.user.origin": "image"}
            if kind == tarfile.CHRTYPE:
                ti.type, ti.devmajor, ti.devminor = kind, 1, 3
                tf.addfile(ti)
            elif kind:
                ti.type, ti.linkname = kind, link
                tf.addfile(ti)
            elif data is None:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        add("bin", mode=0o755)
        add("bin/su", b"#!/bin/sh\n", mode=0o4755)
        add("bin/sh", kind=tarfile.SYMTYPE, link="su", mode=0o777)
        add("etc", mode=0o755)
        add("etc/shadow", b"root:*:\n", mode=0o640, gid=42)
        add("srv", mode=0o755, uid=1000, gid=1000)
        add("srv/data", b"d", mode=0o600, uid=1000, gid=1000)
        add("dev", mode=0o755)
        add("dev/null", mode=0o666, kind=tarfile.CHRTYPE)
        add("etc/hosts", b"127.0.0.1 localhost\n", mode=0o644)
        add("etc/hosts.link", mode=0o644, kind=tarfile.LNKTYPE, link="etc/hosts")
        add("home", mode=0o755)
        add("home/u", mode=0o755, uid=user_uid, gid=user_uid)
    return buf.getvalue()


def test_mount_returns_live_and_daemon_exits_after_umount(shared_tmp):
    root, mp = shared_tmp / "root", shared_tmp / "mp"
    mp.mkdir()
    assert fusesnap(root, "prepare", "k").returncode == 0
    r = fusesnap(root, "mount", "k", str(mp))
    assert r.returncode == 0, r.stderr
    assert is_mounted(mp)  # no waiting: live when the command returns
    pids = daemons_for(mp)
    assert pids
    (mp / "hello").write_bytes(b"hi")
    c = fusesnap(root, "commit", "c", "k")
    assert c.returncode != 0 and b"mounted" in c.stderr  # refused while the upper is in use
    u = fusesnap(root, "umount", str(mp))
    assert u.returncode == 0, u.stderr
    assert not is_mounted(mp)
    assert wait_gone(pids)
    c = fusesnap(root, "commit", "c", "k")
    assert c.returncode == 0
    chain = c.stdout.decode().splitlines()[0]
    assert fusesnap(root, "view", "v", "c").returncode == 0
    assert fusesnap(root, "mount", "v", str(mp)).returncode == 0
    try:
        assert (mp / "hello").read_bytes() == b"hi"
        with pytest.raises(OSError) as ei:
            (mp / "new").write_bytes(b"x")
        assert ei.value.errno == errno.EROFS
    finally:
        subprocess.run(["fusermount3", "-u", str(mp)], check=True)
    assert not is_mounted(mp)
    assert json.loads(fusesnap(root, "stat", "--json", "c").stdout)["chain_id"] == chain
    bad = fusesnap(root, "mount", "c", str(mp))
    assert bad.returncode != 0 and len(bad.stderr.decode().strip().splitlines()) == 1
    nomp = fusesnap(root, "umount", str(mp))
    assert nomp.returncode != 0 and b"not a mount point" in nomp.stderr


def test_mount_foreground_until_fusermount_u(shared_tmp):
    root, mp = shared_tmp / "root", shared_tmp / "mp"
    mp.mkdir()
    assert fusesnap(root, "prepare", "k").returncode == 0
    p = subprocess.Popen([script("fusesnap"), "--root", str(root), "mount", "-f", "k", str(mp)])
    try:
        wait_mounted(mp)
        assert stat.S_IMODE(os.stat(mp).st_mode) == 0o755
        assert p.poll() is None
        subprocess.run(["fusermount3", "-u", str(mp)], check=True)
        assert p.wait(timeout=20) == 0
    finally:
        if p.poll() is None:
            unmount(mp)
            p.wait(timeout=20)


@pytest.mark.rootless
def test_rootless_mount_presents_tar_owners_and_commit_records_them(shared_tmp, test_user):
    pw = test_user
    env = user_env(pw)
    root, mp, tarp = shared_tmp / "root", shared_tmp / "mp", shared_tmp / "image.tar"
    tarp.write_bytes(image_tar(pw.pw_uid))
    os.chmod(tarp, 0o644)

    def fs(*args: str) -> subprocess.CompletedProcess:
        return run_as(pw, [script("fusesnap"), "--root", str(root), *args], env=env)

    run_as(pw, ["mkdir", str(mp)], check=True)

    def ustat(*rels: str) -> list[str]:
        r = run_as(pw, ["stat", "-c", "%u:%g:%a:%F", *[str(mp / p) for p in rels]], env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout.decode().splitlines()
    imp = fs("import", str(tarp))
    assert imp.returncode == 0, imp.stderr
    image = imp.stdout.decode().split()[0]
    # on the host, every layer file belongs to the unprivileged user
    for dirpath, dirs, files in os.walk(root / "layers"):
        for n in dirs + files:
            assert os.lstat(os.path.join(dirpath, n)).st_uid == pw.pw_uid
    assert fs("prepare", "work", image).returncode == 0
    m = fs("mount", "work", str(mp))
    assert m.returncode == 0, m.stderr
    try:
        # (root cannot enter a user's FUSE mount without allow_other: look through the user's eyes)
        assert ustat("bin/su", "bin/sh", "etc/shadow", "srv", "srv/data") == [
            "0:0:4755:regular file", "0:0:777:symbolic link", "0:42:640:regular file",
            "1000:1000:755:directory", "1000:1000:600:regular file"]
        # devices, hard links, times and xattrs come from the index too
        r = run_as(pw, ["stat", "-c", "%F %t:%T %h %i %Y", str(mp / "dev/null"), str(mp / "etc/hosts"),
                        str(mp / "etc/hosts.link")], env=env)
        dev, hosts, link = r.stdout.decode().splitlines()
        assert dev.startswith("character special file 1:3 1 ")
        assert hosts.split()[-3:] == link.split()[-3:] and hosts.split()[-3] == "2"
        assert hosts.endswith(str(T))
        x = run_as(pw, ["getfattr", "--only-values", "-n", "user.origin", str(mp / "etc/hosts")], env=env)
        assert x.stdout == b"image", x.stderr
        w = run_as(pw, ["sh", "-c", f"echo hi > {mp}/home/u/f && chmod 0600 {mp}/home/u/f && "
                        f"mkdir {mp}/home/u/d && mkdir {mp}/home/u/locked && echo x > {mp}/home/u/locked/in && "
                        f"echo s > {mp}/home/u/secret && chmod 000 {mp}/home/u/secret {mp}/home/u/locked && "
                        f"cat {mp}/home/u/f"], env=env)
        assert w.returncode == 0 and w.stdout == b"hi\n", w.stderr
        # rootless, like fuse-overlayfs, the user acts as root of the image: delete a root-owned
        # file, chown one to another owner (recorded as presented metadata, not on the host)
        w2 = run_as(pw, ["sh", "-c", f"rm {mp}/bin/sh && chown 0:7 {mp}/home/u/f && chmod 4711 {mp}/srv/data"],
                    env=env)
        assert w2.returncode == 0, w2.stderr
        assert ustat("home/u/f", "srv/data") == ["0:7:600:regular file", "1000:1000:4711:regular file"]
    finally:
        u = fs("umount", str(mp))
        assert u.returncode == 0, u.stderr
    upper = next((root / "snapshots").glob("[0-9]*")) / "upper" / "home" / "u"
    # the daemon keeps its own host objects reachable (owner rw, x for a dir): the presented
    # 000 lives in the override xattr, so that the user, root of the view, still reaches them
    modes = {n: stat.S_IMODE(os.lstat(upper / n).st_mode) for n in ("secret", "locked")}
    assert modes == {"secret": 0o600, "locked": 0o700}
    assert os.getxattr(upper / "secret", "user.containers.override_stat").endswith(b":00")
    d = fs("diff", "work")
    assert d.returncode == 0, d.stderr
    # writing the changeset leaves the host modes as they were
    assert {n: stat.S_IMODE(os.lstat(upper / n).st_mode) for n in ("secret", "locked")} == modes
    c = fs("commit", "mine", "work")
    assert c.returncode == 0, c.stderr
    e = fs("export", "mine")
    assert e.stdout == d.stdout
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(e.stdout))}
    assert (members["home/u/secret"].mode, members["home/u/locked"].mode) == (0, 0)
    assert tarfile.open(fileobj=io.BytesIO(e.stdout)).extractfile("home/u/secret").read() == b"s\n"
    assert "home/u/locked/in" in members
    f = members["home/u/f"]
    assert (f.uid, f.gid, f.mode) == (0, 7, 0o600)
    data = members["srv/data"]
    assert (data.uid, data.gid, data.mode) == (1000, 1000, 0o4711)
    assert members["home/u"].uid == pw.pw_uid  # copied-up dir keeps the owner the tar gave it
    assert "bin/.wh.sh" in members
    # nothing the user did put a setuid bit or a foreign owner on the host
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            st = os.lstat(os.path.join(dirpath, n))
            assert st.st_uid == pw.pw_uid and not st.st_mode & 0o6000, os.path.join(dirpath, n)
    # a view of the committed chain shows both layers with the tar's owners
    assert fs("view", "v", "mine").returncode == 0
    assert fs("mount", "v", str(mp)).returncode == 0
    try:
        assert ustat("bin/su", "home/u/f", "home/u/d", "srv/data") == [
            "0:0:4755:regular file", "0:7:600:regular file",
            f"{pw.pw_uid}:{pw.pw_gid}:755:directory", "1000:1000:4711:regular file"]
        assert run_as(pw, ["test", "-e", f"{mp}/bin/sh"], env=env).returncode != 0
        assert run_as(pw, ["cat", f"{mp}/home/u/f"], env=env).stdout == b"hi\n"
    finally:
        assert fs("umount", str(mp)).returncode == 0
    assert fs("remove", "v", "mine").returncode == 0


def test_mounts_json_works_with_the_fuse3_mount_helper(shared_tmp):
    """What containerd does with a `fuse3.X` mount: mount.fuse3 SOURCE TARGET -t X -o OPTIONS."""
    root, mp = shared_tmp / "root", shared_tmp / "mp"
    mp.mkdir()
    assert fusesnap(root, "prepare", "k").returncode == 0
    (m,) = json.loads(fusesnap(root, "mounts", "k").stdout)
    assert m["type"].startswith("fuse3.")
    env = dict(os.environ, PATH=f"{Path(script('fusesnap')).parent}:{os.environ.get('PATH', '')}")
    r = subprocess.run(["mount.fuse3", m["source"], str(mp), "-t", m["type"].split(".", 1)[1],
                        "-o", ",".join(m["options"])], env=env, capture_output=True)
    assert r.returncode == 0, r.stderr
    try:
        (mp / "hello").write_bytes(b"via mount.fuse3")
    finally:
        assert fusesnap(root, "umount", str(mp)).returncode == 0
    c = fusesnap(root, "commit", "c", "k")
    assert c.returncode == 0
    e = fusesnap(root, "export", "c")
    assert tarfile.open(fileobj=io.BytesIO(e.stdout)).extractfile("hello").read() == b"via mount.fuse3"
    bad = subprocess.run([script("fusesnap"), "fusesnap", str(mp), "-o", "rw"], capture_output=True)
    assert bad.returncode != 0 and b"snapshot=KEY" in bad.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mount(2) of a FUSE connection needs root")
@pytest.mark.parametrize("server", ["mount server", "own process"])
def test_mount_serves_a_connection_mounted_ahead(shared_tmp, server):
    """libfuse's /dev/fd/N: `fusesnap mount KEY /dev/fd/N` serves a connection another process
    mounted (as `fusesnap serve` does, and mount.fuse3 -o drop_privileges); requests made before
    it answers INIT wait in the kernel."""
    from fusesnap.fs.fuse.mount import planned_fuse_options
    from fusesnap.fs.options import parse_options
    from fusesnap.linux import fuseconn
    from fusesnap.snapshots.mounting import fsname_for
    from fusesnap.snapshots.snapshotter import Snapshotter

    env = {**os.environ, "FUSESNAP_MOUNT_SERVER": "0" if server == "own process" else "1"}
    root, mp = shared_tmp / "root", shared_tmp / "mp"
    mp.mkdir()
    assert fusesnap(root, "prepare", "w").returncode == 0
    assert fusesnap(root, "commit", "base", "w").returncode == 0
    assert fusesnap(root, "prepare", "k", "base").returncode == 0
    with Snapshotter(root) as sn:
        opts = parse_options([])
        opts.fsname = fsname_for(sn, sn.record("k").id)
    fd = fuseconn.mount(str(mp), planned_fuse_options(opts, False))
    try:
        # (from the mount table: a stat of mp would wait for the daemon, like the request below)
        assert str(mp) in [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
        # a request now waits for the daemon (started below) instead of failing
        early = subprocess.Popen(["sh", "-c", f"echo early > {mp}/early"])
        r = fusesnap(root, "mount", "k", "/dev/fd/0", stdin=fd, env=env)
        assert r.returncode == 0, r.stderr
    finally:
        os.close(fd)
    assert early.wait(30) == 0
    (mp / "late").write_text("late\n")
    assert sorted(os.listdir(mp)) == ["early", "late"]
    line = next(ln.split() for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                if ln.split()[4] == str(mp))
    assert line[line.index("-") + 2] == opts.fsname and {"nosuid", "nodev"} <= set(line[5].split(","))
    busy = fusesnap(root, "mount", "k", str(shared_tmp))       # the worker holds the snapshot's lock
    assert busy.returncode != 0 and b"mounted" in busy.stderr
    pids = daemons_for(mp) if server == "mount server" else []
    u = fusesnap(root, "umount", str(mp))
    assert u.returncode == 0, u.stderr
    assert wait_gone(pids)
    c = fusesnap(root, "commit", "c", "k")
    assert c.returncode == 0, c.stderr
    assert fusesnap(root, "view", "v", "c").returncode == 0
    assert fusesnap(root, "mount", "v", str(mp)).returncode == 0
    try:
        assert (mp / "early").read_text() == "early\n" and (mp / "late").read_text() == "late\n"
    finally:
        assert fusesnap(root, "umount", str(mp)).returncode == 0


def test_mount_refuses_a_descriptor_that_is_no_connection(shared_tmp):
    root = shared_tmp / "root"
    assert fusesnap(root, "prepare", "k").returncode == 0
    with open(shared_tmp / "plain", "w+b") as f:
        r = fusesnap(root, "mount", "k", "/dev/fd/0", stdin=f.fileno())
    assert r.returncode != 0
    assert r.stderr.decode().strip().splitlines() == ["fusesnap: error: /dev/fd/0 is not an open FUSE connection (/dev/fuse)"]
    assert fusesnap(root, "remove", "k").returncode == 0
