"""FUSE_HANDLE_KILLPRIV_V2 (pyfuse3 patch 0008): the kernel marks the mount SB_NOSEC, so a
write no longer asks the daemon for security.capability every time, and the daemon drops
setuid/setgid itself where the kernel would: a write, truncate or fallocate by a caller
without CAP_FSETID, and any chown (even to the same owner, even chown(f, -1, -1), which a
non-owner may not do). Each case runs on kernel overlayfs and on fusesnap-overlay and must
end the same; security.capability still goes on the first write."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from helpers import is_root
from test_fs_kernel_caching import count_requests
from unionmount import FUSESNAP, KINDS, built_union, fallocate, layout, mkfile, mount_union, scratch

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root to mount and to change owners")

SUIDGID = 0o6775
# a version-2 security.capability granting cap_net_raw (what setcap cap_net_raw+ep writes)
CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)


def _build(l0: Path, l1: Path) -> None:
    mkfile(l1 / "lower-suid", b"lower", SUIDGID)


@pytest.fixture(params=KINDS)
def u(request, test_user):
    # the test user works in root's mount: fusesnap must be asked to let other users in
    with built_union(request.param, _build, extra=["allow_other"] if request.param == FUSESNAP else []) as un:
        un.user = test_user
        yield un


def _mode(u, name: str) -> int:
    return stat.S_IMODE(os.lstat(u.p(name)).st_mode)


def _suid_file(u, name: str, owner) -> Path:
    p = u.p(name)
    p.write_bytes(b"0123456789")
    os.chown(p, owner.pw_uid, owner.pw_gid)
    os.chmod(p, SUIDGID)
    return p


def _as(user, fn) -> int:
    """Run fn() in a child with user's ids and no capabilities; its errno (0: fine)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            fn()
        except OSError as e:
            code = e.errno or 1
        except BaseException:
            code = 255
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _append(p: Path) -> None:
    with open(p, "ab") as f:
        f.write(b"more")


def _falloc(p: Path) -> None:
    fd = os.open(p, os.O_WRONLY)
    try:
        fallocate(fd, 0, 0, 1 << 16)
    finally:
        os.close(fd)


@pytest.mark.parametrize("what", ["write", "truncate", "fallocate", "write-lower"])
def test_a_caller_without_cap_fsetid_drops_setuid_and_setgid(u, what):
    user = u.user
    if what == "write-lower":
        os.chown(u.p("lower-suid"), user.pw_uid, user.pw_gid)     # copies up, keeps the bits
        os.chmod(u.p("lower-suid"), SUIDGID)
        p = u.p("lower-suid")
    else:
        p = _suid_file(u, what, user)
    act = {"write": _append, "write-lower": _append, "fallocate": _falloc,
           "truncate": lambda q: os.truncate(q, 3)}[what]
    assert _as(user, lambda: act(p)) == 0
    assert _mode(u, p.name) == 0o775


def test_root_writes_keep_the_bits(u):
    p = _suid_file(u, "rootwrite", u.user)
    _append(p)
    os.truncate(p, 2)
    assert _mode(u, "rootwrite") == SUIDGID


def test_chown_drops_the_bits_even_to_the_same_owner(u):
    user = u.user
    same = _suid_file(u, "same", user)
    os.chown(same, user.pw_uid, user.pw_gid)
    assert _mode(u, "same") == 0o775
    noids = _suid_file(u, "noids", user)
    os.chown(noids, -1, -1)
    assert _mode(u, "noids") == 0o775
    sgid_only = _suid_file(u, "sgid-only", user)
    os.chmod(sgid_only, 0o2764)                       # setgid without group-exec: a lock marker
    os.chown(sgid_only, user.pw_uid, user.pw_gid)
    assert _mode(u, "sgid-only") == 0o2764


def test_chown_without_ids_by_a_non_owner_is_refused(u):
    p = _suid_file(u, "rootowned", u.user)
    os.chown(p, 0, 0)
    os.chmod(p, SUIDGID)
    assert _as(u.user, lambda: os.chown(p, -1, -1)) == 1          # EPERM: it would change the mode
    assert _mode(u, "rootowned") == SUIDGID


def test_a_write_removes_security_capability(u):
    p = u.p("capped")
    p.write_bytes(b"binary")
    os.setxattr(p, "security.capability", CAP_NET_RAW)
    assert os.getxattr(p, "security.capability") == CAP_NET_RAW
    _append(p)
    with pytest.raises(OSError):
        os.getxattr(p, "security.capability")


def test_writes_no_longer_ask_for_security_capability(tmp_path, monkeypatch):
    requests = count_requests(tmp_path, monkeypatch)
    with scratch("fusesnap-kp-") as base:
        (l0,), upper, work, mnt = layout(base, 1)
        un = mount_union(FUSESNAP, mnt, [l0], upper, work)
        try:
            with open(un.p("f"), "wb") as f:
                for _ in range(100):
                    f.write(b"x" * 100)
                    f.flush()
        finally:
            un.unmount()
    seen = requests()
    assert seen["write"] >= 100
    assert seen["getxattr"] <= 2, f"{seen['getxattr']} GETXATTRs for 100 writes (SB_NOSEC not set)"


def test_killpriv_v2_is_asked_for_only_in_the_initial_user_namespace():
    """Root of a user namespace keeps setuid bits on its writes under kernel overlayfs, but
    the kernel would flag its WRITEs as coming from a caller without CAP_FSETID."""
    import subprocess
    import sys

    probe = "from fusesnap.linux.kernel import in_initial_user_namespace as f; print(f())"
    here = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    inside = subprocess.run(["unshare", "-Ur", sys.executable, "-c", probe], capture_output=True, text=True)
    assert here.stdout.strip() == "True"
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.strip() == "False"
