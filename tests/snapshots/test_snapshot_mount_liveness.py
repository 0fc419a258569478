"""A snapshot mounted in another mount namespace is still mounted (issue 13, item 5).

The mount is made inside `unshare -m --propagation private` (as root) or
`unshare -Urm` (as an unprivileged user), so the host's mount table never shows
it. remove, commit and a second read-write mount from the host must still be
refused while its daemon serves, and the writer's data must survive; once the
daemon is gone they go through.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import fuse_daemon, is_mounted, one_file_tar, is_root, run_as, script, unmount, user_env, wait_exited

pytestmark = pytest.mark.skipif(not is_root(), reason="unshare -m and nsenter need root")


class Store:
    def __init__(self, root: Path, user=None) -> None:
        self.root, self.user = root, user

    def cmd(self, *args: str) -> list[str]:
        return [script("fusesnap"), "--root", str(self.root), *args]

    def run(self, *args: str) -> subprocess.CompletedProcess:
        if self.user is not None:
            return run_as(self.user, self.cmd(*args), text=True, timeout=120, env=user_env(self.user))
        return subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=120)

    def ok(self, *args: str) -> str:
        r = self.run(*args)
        assert r.returncode == 0, r.stderr
        return r.stdout


def _refused(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def _setup(base: Path, user=None) -> tuple[Store, Path, Path]:
    root, mp, mp2 = base / "root", base / "mp", base / "mp2"
    for d in (mp, mp2):
        d.mkdir()
        if user is not None:
            os.chown(d, user.pw_uid, user.pw_gid)
    tar = base / "l.tar"
    tar.write_bytes(one_file_tar("base", b"base\n"))
    s = Store(root, user)
    chain = s.ok("import", str(tar)).split()[0]
    s.ok("prepare", "k", chain)
    s.ok("view", "v", chain)
    return s, mp, mp2


def test_mount_in_a_private_namespace_keeps_remove_and_commit_away(shared_tmp):
    s, mp, mp2 = _setup(shared_tmp)
    r = subprocess.run(["unshare", "-m", "--propagation", "private", *s.cmd("mount", "k", str(mp))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not is_mounted(mp), "the mount leaked into the host's namespace"
    pid = fuse_daemon(mp)
    try:
        subprocess.run(["nsenter", "-t", str(pid), "-m", "sh", "-c", f"echo kept > {mp}/written"], check=True)
        msg = _refused(s.run("remove", "k"))
        assert "mounted" in msg and "another mount namespace" in msg and str(mp) in msg, msg
        assert "mounted" in _refused(s.run("commit", "c", "k"))
        assert "mounted" in _refused(s.run("mount", "k", str(mp2)))      # never two daemons on one upper
        assert not is_mounted(mp2)
        uppers = list((s.root / "snapshots").glob("*/upper/written"))
        assert [p.read_text() for p in uppers] == ["kept\n"], "the writer's data went away"
        assert s.ok("list").count("active") == 1
    finally:
        subprocess.run(["nsenter", "-t", str(pid), "-m", "umount", str(mp)], capture_output=True)
    assert wait_exited(pid), "the daemon did not exit after its unmount"
    chain = s.ok("commit", "c", "k").split()[0]
    assert chain.startswith("sha256:")


def test_view_mounted_elsewhere_cannot_be_removed_but_mounts_twice(shared_tmp):
    s, mp, mp2 = _setup(shared_tmp)
    r = subprocess.run(["unshare", "-m", "--propagation", "private", *s.cmd("mount", "v", str(mp))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    pid = fuse_daemon(mp)
    try:
        s.ok("mount", "v", str(mp2))            # views are read-only: any number of daemons
        assert (mp2 / "base").read_text() == "base\n"
        unmount(mp2)
        assert "mounted" in _refused(s.run("remove", "v"))
    finally:
        os.kill(pid, signal.SIGTERM)            # the daemon unmounts itself in its namespace
    assert wait_exited(pid)
    s.ok("remove", "v")


@pytest.mark.rootless
def test_rootless_mount_in_a_user_namespace_keeps_remove_away(shared_tmp, test_user):
    s, mp, _ = _setup(shared_tmp, test_user)
    r = run_as(test_user, ["unshare", "-Urm", *s.cmd("mount", "k", str(mp))], text=True, timeout=120,
               env=user_env(test_user))
    assert r.returncode == 0, r.stderr
    pid = fuse_daemon(mp)
    try:
        assert "mounted" in _refused(s.run("remove", "k"))
        assert "mounted" in _refused(s.run("commit", "c", "k"))
    finally:
        os.kill(pid, signal.SIGTERM)
    assert wait_exited(pid)
    s.ok("remove", "k")
