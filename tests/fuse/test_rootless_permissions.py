"""A private rootless mount makes its user root of the view, and every check agrees.

open, create, mkdir, chmod and access(2) follow one rule (fs/core/permissions.py):
what access() answers is what the operation then does, for files the image gives
to root, to another user, and for a mode the user narrowed on their own file.
"""

from __future__ import annotations

import json
import sys

import pytest

from helpers import run_as, script, user_env
from tarbuild import TarBuilder

pytestmark = pytest.mark.rootless

CHECKS = r'''
import errno, json, os, sys
mp = sys.argv[1]
out = {}

def attempt(fn):
    try:
        fn()
        return True
    except OSError as e:
        return errno.errorcode[e.errno]

def append(p):
    with open(p, "a") as f:
        f.write("x")

def read(p):
    with open(p, "rb") as f:
        f.read()

for rel in ("etc/motd", "etc/shadow", "root/secret", "srv/theirs", "home/me/narrowed"):
    p = os.path.join(mp, rel)
    out[rel] = {"access_w": os.access(p, os.W_OK), "append": attempt(lambda: append(p)),
                "access_r": os.access(p, os.R_OK), "read": attempt(lambda: read(p))}
for rel in ("root", "srv"):
    p = os.path.join(mp, rel)
    out[rel] = {"access_w": os.access(p, os.W_OK | os.X_OK),
                "mkdir": attempt(lambda: os.mkdir(os.path.join(p, "new")))}
p = os.path.join(mp, "etc/motd")
out["chmod"] = {"access_w": os.access(p, os.W_OK), "chmod": attempt(lambda: os.chmod(p, 0o600))}
p = os.path.join(mp, "etc/notexec")
out["exec"] = {"access_x": os.access(p, os.X_OK), "exec": attempt(lambda: os.execv(p, [p]))}
print(json.dumps(out))
'''


def _image() -> bytes:
    t = TarBuilder()
    t.add("etc", mode=0o755)
    t.add("etc/motd", b"hello\n", mode=0o644)
    t.add("etc/shadow", b"root:*:\n", mode=0o640, gid=42)
    t.add("etc/notexec", b"#!/bin/sh\n", mode=0o644)
    t.add("root", mode=0o700)
    t.add("root/secret", b"s\n", mode=0o600)
    t.add("srv", mode=0o755, uid=1000, gid=1000)
    t.add("srv/theirs", b"t\n", mode=0o600, uid=1000, gid=1000)
    t.add("home", mode=0o755)
    return t.data()


def test_rootless_access_agrees_with_open_create_and_chmod(shared_tmp, test_user):
    pw = test_user
    env = user_env(pw)
    root, mp, tarp = shared_tmp / "root", shared_tmp / "mp", shared_tmp / "image.tar"
    tarp.write_bytes(_image())
    tarp.chmod(0o644)

    def fs(*args: str):
        r = run_as(pw, [script("fusesnap"), "--root", str(root), *args], env=env)
        assert r.returncode == 0, r.stderr
        return r
    run_as(pw, ["mkdir", str(mp)], check=True)
    chain = fs("import", str(tarp)).stdout.decode().split()[0]
    fs("prepare", "work", chain)
    fs("mount", "work", str(mp))
    try:
        # the user's own file, narrowed to 000 through the mount (applied on the host for real)
        prep = run_as(pw, ["sh", "-c", f"mkdir -p {mp}/home/me && echo n > {mp}/home/me/narrowed && "
                                       f"chmod 000 {mp}/home/me/narrowed"], env=env)
        assert prep.returncode == 0, prep.stderr
        r = run_as(pw, [sys.executable, "-c", CHECKS, str(mp)], env=env)
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
    finally:
        fs("umount", str(mp))
    # root of the view: root's and another user's files are readable and writable
    for rel in ("etc/motd", "etc/shadow", "root/secret", "srv/theirs"):
        assert got[rel] == {"access_w": True, "append": True, "access_r": True, "read": True}, (rel, got[rel])
    for rel in ("root", "srv"):
        assert got[rel] == {"access_w": True, "mkdir": True}, (rel, got[rel])
    assert got["chmod"] == {"access_w": True, "chmod": True}
    # ... but, as for root, nothing without an execute bit runs, and access says so first
    assert got["exec"] == {"access_x": False, "exec": "EACCES"}
    # a mode the user narrowed on their own file does not bind root either (the host file
    # stays readable and writable by the daemon; the presented 000 is in the override xattr)
    assert got["home/me/narrowed"] == {"access_w": True, "append": True, "access_r": True, "read": True}
