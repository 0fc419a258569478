"""A snapshot mounted inside a user namespace and committed from outside it records the owners
the mount presented (mapped back through the namespace the mount ran in), not host ids.

Real namespaces: the unprivileged test user mounts inside `unshare --map-root-user
--map-auto -m` (its uid is root there, its subordinate ids the rest), writes and chowns
through the mount, unmounts, and commits from the host; the same changes committed from
inside the namespace give the same layer.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from helpers import run_as, script, user_env

pytestmark = pytest.mark.rootless

WRITE = "{fs} mount {key} {mp} && mkdir {mp}/home {mp}/home/dave && echo hi > {mp}/motd && " \
        "echo s > {mp}/shadow && chown 0:42 {mp}/shadow && chmod 640 {mp}/shadow && " \
        "chown 1000:1000 {mp}/home/dave; rc=$?; {fs} umount {mp}; exit $rc"


def _owners(tar: bytes) -> dict[str, tuple[int, int, int]]:
    return {m.name: (m.uid, m.gid, m.mode) for m in tarfile.open(fileobj=io.BytesIO(tar))}


NS = ["unshare", "--map-root-user", "--map-auto", "--mount"]


@pytest.fixture
def ns_user(test_user):
    """The test user, with subordinate ids for --map-auto (newuidmap, from uidmap)."""
    if not shutil.which("newuidmap"):
        pytest.skip("newuidmap (Debian package uidmap) is not installed")
    for f, flag in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
        try:
            have = any(line.split(":")[0] == test_user.pw_name for line in open(f))
        except FileNotFoundError:
            have = False
        if not have:
            subprocess.run(["usermod", flag, "300000-365535", test_user.pw_name], check=True)
    return test_user


def test_commit_from_the_host_maps_owners_back_into_the_mounts_namespace(shared_tmp, ns_user):
    pw = ns_user
    env = user_env(pw)
    root = shared_tmp / "root"
    fs = f"{script('fusesnap')} --root {root}"

    def sh(cmd: str, ns: bool = False) -> subprocess.CompletedProcess:
        argv = [*NS, "sh", "-c", cmd] if ns else ["sh", "-c", cmd]
        return run_as(pw, argv, env=env)

    for key in ("outside", "inside"):
        mp = shared_tmp / f"mp-{key}"
        assert sh(f"mkdir {mp} && {fs} prepare {key}").returncode == 0
        r = sh(WRITE.format(fs=fs, key=key, mp=mp), ns=True)
        assert r.returncode == 0, r.stderr
    # on the host, the upper holds the user's own uid where the namespace said 0
    upper_owner = Path(next((root / "snapshots").glob("[0-9]*")) / "upper" / "motd").stat().st_uid
    assert upper_owner == pw.pw_uid
    c1 = sh(f"{fs} commit from-host outside")
    assert c1.returncode == 0, c1.stderr
    c2 = sh(f"{fs} commit from-inside inside", ns=True)
    assert c2.returncode == 0, c2.stderr
    t1 = sh(f"{fs} export from-host").stdout
    t2 = sh(f"{fs} export from-inside").stdout
    owners = _owners(t1)
    assert owners["motd"][:2] == (0, 0)
    assert owners["shadow"] == (0, 42, 0o640)
    assert owners["home/dave"][:2] == (1000, 1000)
    assert owners == _owners(t2)  # the same owners, whichever namespace committed it


def test_a_snapshot_mounted_from_two_namespaces_is_not_committed_with_mixed_owners(shared_tmp, ns_user):
    pw = ns_user
    env = user_env(pw)
    root, mp = shared_tmp / "root", shared_tmp / "mp"
    fs = f"{script('fusesnap')} --root {root}"

    def sh(cmd: str, ns: bool = False) -> subprocess.CompletedProcess:
        argv = [*NS, "sh", "-c", cmd] if ns else ["sh", "-c", cmd]
        return run_as(pw, argv, env=env)

    assert sh(f"mkdir {mp} && {fs} prepare k").returncode == 0
    assert sh(f"{fs} mount k {mp} && echo a > {mp}/a; {fs} umount {mp}", ns=True).returncode == 0
    assert sh(f"{fs} mount k {mp} && echo b > {mp}/b; {fs} umount {mp}").returncode == 0
    r = sh(f"{fs} commit c k")
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "user namespaces" in err, err
    assert sh(f"{fs} stat k").returncode == 0  # nothing was committed, the snapshot is still there
