"""fusesnap-overlay's command-line contract: fuse-overlayfs-compatible options, the
mount.fuse3 form, daemonizing only once the mount is live, failures, exit on unmount."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import is_mounted, is_root, run_as, wait_mounted
from unionmount import (FUSESNAP, KERNEL, KINDS, daemon_pids, errno_of, layout, mkdir,
                        mkfile, mount_union, overlay_cmd, overlay_opts, run_overlay, wait_gone)

pytestmark = pytest.mark.skipif(not is_root(), reason="mounting as root; rootless cases: test_overlay_rootless")


def _two_lowers(base: Path):
    lowers, upper, work, mnt = layout(base, 2)
    mkfile(lowers[0] / "top", "top\n")
    mkfile(lowers[1] / "bottom", "bottom\n")
    mkfile(lowers[1] / "top", "hidden\n")
    return lowers, upper, work, mnt


def _check_merged(mnt: Path) -> None:
    assert sorted(os.listdir(mnt)) == ["bottom", "top"]
    assert (mnt / "top").read_text() == "top\n"
    assert (mnt / "bottom").read_text() == "bottom\n"


def test_version_prints_a_version_line():
    r = subprocess.run(overlay_cmd() + ["--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    first = r.stdout.strip().splitlines()[0]
    assert re.search(r"\d+\.\d+", first), r.stdout


@pytest.mark.parametrize("how", ["umount", "fusermount3"])
def test_daemonizes_once_live_and_exits_when_unmounted(shared_tmp, how):
    lowers, upper, work, mnt = _two_lowers(shared_tmp)
    u = mount_union(FUSESNAP, mnt, lowers, upper, work)  # asserts: live as soon as the program returned
    _check_merged(mnt)
    (mnt / "new").write_text("x")
    assert (upper / "new").read_text() == "x"
    assert u.pids, "no daemon process names the mount point"
    subprocess.run([how, "-u", str(mnt)] if how == "fusermount3" else ["umount", str(mnt)], check=True)
    assert not wait_gone(u.pids), f"daemon still running after {how}"
    assert not is_mounted(mnt)


def test_mount_program_does_not_hold_callers_pipes(shared_tmp):
    """podman/containers-storage read the program's stderr to EOF: the daemon must let go of it."""
    lowers, upper, work, mnt = _two_lowers(shared_tmp)
    p = subprocess.Popen(overlay_cmd() + ["-o", overlay_opts(lowers, upper, work), str(mnt)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"stdout/stderr not closed 60 s after mounting (rc={p.returncode}); a caller "
                    f"reading them to EOF hangs; stderr: {err!r}")
    assert p.returncode == 0, err
    assert is_mounted(mnt)
    _check_merged(mnt)


@pytest.mark.parametrize("flag", ["-f", "-d"])
def test_foreground_stays_until_unmounted(shared_tmp, flag):
    """-f keeps the program in the foreground; -d (debug) implies it, like fuse-overlayfs."""
    lowers, upper, work, mnt = _two_lowers(shared_tmp)
    p = subprocess.Popen(overlay_cmd() + [flag, "-o", overlay_opts(lowers, upper, work), str(mnt)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        wait_mounted(mnt, 60)
        _check_merged(mnt)
        assert p.poll() is None, f"{flag} must keep the program in the foreground"
        subprocess.run(["umount", str(mnt)], check=True)
        assert p.wait(timeout=20) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_mount_fuse3_argument_order(shared_tmp):
    """`PROG SOURCE MOUNTPOINT -o OPTS`, exactly as mount.fuse3 calls it."""
    lowers, upper, work, mnt = _two_lowers(shared_tmp)
    rc, err = run_overlay(["overlay", str(mnt), "-o", "rw," + overlay_opts(lowers, upper, work) + ",dev,suid"])
    assert rc == 0, err
    assert is_mounted(mnt)
    _check_merged(mnt)
    pids = daemon_pids(mnt)
    subprocess.run(["umount", str(mnt)], check=True)
    assert not wait_gone(pids)


def test_mount_t_fuse_through_mount_fuse3(shared_tmp):
    """`mount -t fuse PROG#overlay MNT -o ...` goes through /sbin/mount.fuse3 (containerd's path)."""
    prog = shutil.which(overlay_cmd()[0])
    if prog is None or len(overlay_cmd()) > 1:
        pytest.skip("mount program is not a single executable")
    lowers, upper, work, mnt = _two_lowers(shared_tmp)
    # mount.fuse3 runs PROG from a sanitized PATH; the "PROG#SOURCE" form names it absolutely
    r = subprocess.run(["mount", "-t", "fuse", f"{prog}#overlay", str(mnt), "-o", overlay_opts(lowers, upper, work)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert is_mounted(mnt)
    _check_merged(mnt)
    pids = daemon_pids(mnt)
    subprocess.run(["umount", str(mnt)], check=True)
    assert not wait_gone(pids)


@pytest.mark.parametrize("case", ["missing-lower", "no-lowerdir", "missing-upper", "missing-mountpoint",
                                  "lower-is-a-file", "mountpoint-is-a-file"])
def test_mount_failure_exits_nonzero_with_reason(shared_tmp, case):
    lowers, upper, work, mnt = _two_lowers(shared_tmp)
    bad = shared_tmp / "does-not-exist"
    args = {
        "missing-lower": (overlay_opts([lowers[0], bad], upper, work), mnt, str(bad)),
        "no-lowerdir": (f"upperdir={upper},workdir={work}", mnt, "lowerdir"),
        "missing-upper": (overlay_opts(lowers, bad, work), mnt, str(bad)),
        "missing-mountpoint": (overlay_opts(lowers, upper, work), bad, str(bad)),
        "lower-is-a-file": (overlay_opts([lowers[0], lowers[1] / "bottom"], upper, work), mnt,
                            str(lowers[1] / "bottom")),
        "mountpoint-is-a-file": (overlay_opts(lowers, upper, work), lowers[0] / "top", str(lowers[0] / "top")),
    }[case]
    opts, target, named = args
    rc, err = run_overlay(["-o", opts, str(target)], timeout=60)
    assert rc != 0, f"{case}: exit 0"
    assert named in err, f"{case}: stderr does not name {named!r}: {err!r}"
    assert len(err.strip().splitlines()) <= 3, f"{case}: expected a short reason, got {err!r}"
    assert not is_mounted(target)
    assert not daemon_pids(target)


def test_unknown_option_warns_but_mounts(shared_tmp):
    lowers, upper, work, mnt = _two_lowers(shared_tmp)
    u = mount_union(FUSESNAP, mnt, lowers, upper, work, ["frobnicate=7"])
    try:
        assert "frobnicate" in u.stderr
        _check_merged(mnt)
    finally:
        u.unmount()


def test_accepts_every_fuse_overlayfs_option_and_empty_items(shared_tmp):
    lowers, upper, work, mnt = _two_lowers(shared_tmp)
    extra = ["", "rw", "dev", "suid", "noatime", "allow_other", "default_permissions", "volatile",
             "timeout=5", "fsync=0", "", "xattr_permissions=0", ""]  # empty items: a,,b, trailing comma
    u = mount_union(FUSESNAP, mnt, lowers, upper, work, extra)
    try:
        _check_merged(mnt)
        (mnt / "w").write_text("w")
        assert (upper / "w").read_text() == "w"
        for opt in ("rw", "dev", "suid", "noatime", "allow_other", "default_permissions", "volatile", "timeout"):
            assert not re.search(rf"\b{opt}\b", u.stderr), f"known option {opt} warned about: {u.stderr}"
        with open("/proc/self/mountinfo") as f:
            flags = next(x for x in f if x.split()[4] == str(mnt)).split()[5].split(",")
        assert "nodev" not in flags and "nosuid" not in flags, f"dev,suid not applied: {flags}"
        assert "noatime" in flags, flags
    finally:
        u.unmount()


@pytest.mark.parametrize("kind", KINDS)
def test_without_upperdir_the_mount_is_read_only(shared_tmp, kind):
    lowers, upper, work, mnt = _two_lowers(shared_tmp)
    mkdir(lowers[1] / "d")
    u = mount_union(kind, mnt, lowers)
    try:
        _check_merged_with_dir(mnt)
        assert (mnt / "top").read_text() == "top\n"
        assert errno_of(lambda: open(mnt / "new", "w")) == errno.EROFS
        assert errno_of(lambda: open(mnt / "top", "a")) == errno.EROFS
        assert errno_of(os.unlink, mnt / "bottom") == errno.EROFS
        assert errno_of(os.chmod, mnt / "top", 0o600) == errno.EROFS
        assert errno_of(os.mkdir, mnt / "nd") == errno.EROFS
        assert errno_of(os.rename, mnt / "top", mnt / "top2") == errno.EROFS
        assert errno_of(os.setxattr, mnt / "top", "user.x", b"1") == errno.EROFS
        assert not os.access(mnt / "top", os.W_OK)
        assert sorted(os.listdir(lowers[0])) == ["top"]
    finally:
        u.unmount()


def _check_merged_with_dir(mnt: Path) -> None:
    assert sorted(os.listdir(mnt)) == ["bottom", "d", "top"]


def test_ro_option_makes_writes_fail_with_erofs(shared_tmp):
    lowers, upper, work, mnt = _two_lowers(shared_tmp)
    u = mount_union(FUSESNAP, mnt, lowers, upper, work, ["ro"])
    try:
        _check_merged(mnt)
        assert errno_of(lambda: open(mnt / "new", "w")) == errno.EROFS
        assert errno_of(os.unlink, mnt / "top") == errno.EROFS
        assert os.listdir(upper) == []
    finally:
        u.unmount()


@pytest.mark.parametrize("kind", KINDS)
def test_lowerdir_with_escaped_colons(shared_tmp, kind):
    lowers, upper, work, mnt = layout(shared_tmp, 0)
    a, b = shared_tmp / "lay:er:a", shared_tmp / "b:"
    mkfile(a / "from-a", "a")
    mkfile(b / "from-b", "b")
    mkfile(b / "from-a", "hidden")
    u = mount_union(kind, mnt, [a, b], upper, work)  # overlay_opts escapes ':' as '\:'
    try:
        assert sorted(os.listdir(mnt)) == ["from-a", "from-b"]
        assert (mnt / "from-a").read_text() == "a"
    finally:
        u.unmount()


@pytest.mark.parametrize("kind", KINDS)
def test_relative_lowerdirs_and_podman_style_symlinks(shared_tmp, kind):
    """podman runs the mount program in its overlay dir with lowerdir=l/ID1:l/ID2 (symlinks)."""
    home = shared_tmp / "overlay"
    for layer, name in (("aaa", "one"), ("bbb", "two")):
        mkfile(home / layer / "diff" / name, name)
    (home / "l").mkdir()
    os.symlink("../aaa/diff", home / "l" / "ID1")
    os.symlink("../bbb/diff", home / "l" / "ID2")
    upper, work, mnt = home / "ccc" / "diff", home / "ccc" / "work", shared_tmp / "merged"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    opts = "lowerdir=l/ID1:l/ID2,upperdir=ccc/diff,workdir=ccc/work"
    if kind == KERNEL:
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts + ",redirect_dir=on,index=on",
                            str(mnt)], cwd=home, capture_output=True, text=True)
        rc, err = r.returncode, r.stderr
    else:
        rc, err = run_overlay(["-o", opts, str(mnt)], cwd=home)
    assert rc == 0, err
    pids = daemon_pids(mnt)
    try:
        assert sorted(os.listdir(mnt)) == ["one", "two"]
        assert (mnt / "two").read_text() == "two"
        (mnt / "three").write_text("3")
        assert (upper / "three").read_text() == "3"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        wait_gone(pids)


@pytest.mark.rootless
@pytest.mark.parametrize("kind", KINDS)
def test_root_mount_checks_permissions_for_other_users(shared_tmp, kind, test_user):
    """As root with allow_other asked for, the kernel checks other users' access
    (default_permissions is on by default)."""
    lowers, upper, work, mnt = layout(shared_tmp, 1)
    mkfile(lowers[0] / "public", "pub", 0o644)
    mkfile(lowers[0] / "secret", "sec", 0o600)
    mkdir(lowers[0] / "closed", 0o755)
    mkdir(lowers[0] / "open", 0o777)
    u = mount_union(kind, mnt, lowers, upper, work, ["allow_other"] if kind == FUSESNAP else [])
    try:
        probe = (
            "import os,sys\n"
            "m=sys.argv[1]\n"
            "def t(f):\n"
            "  try: f(); return 'ok'\n"
            "  except OSError as e: return str(e.errno)\n"
            "print(t(lambda: open(m+'/public').read()), t(lambda: open(m+'/secret').read()),"
            " t(lambda: open(m+'/closed/f','w').close()), t(lambda: open(m+'/open/f','w').close()),"
            " t(lambda: open(m+'/public','a').close()))\n"
            "print(os.access(m+'/public', os.R_OK), os.access(m+'/public', os.W_OK),"
            " os.access(m+'/secret', os.R_OK), os.access(m+'/open', os.W_OK | os.X_OK))\n"
        )
        r = run_as(test_user, ["/usr/bin/python3", "-c", probe, str(mnt)], text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].split() == ["ok", str(errno.EACCES), str(errno.EACCES), "ok", str(errno.EACCES)]
        assert lines[1].split() == ["True", "False", "False", "True"], "access(2) as the other user"
        assert os.stat(mnt / "open" / "f").st_uid == test_user.pw_uid
        if kind == FUSESNAP:
            with open("/proc/self/mountinfo") as f:
                line = next(x for x in f if x.split()[4] == str(mnt))
            assert "allow_other" in line and "default_permissions" in line, line
    finally:
        u.unmount()


@pytest.mark.parametrize("kind", KINDS)
def test_two_mounts_share_lowers_independently(shared_tmp, kind):
    """Many containers from one image: same lowers, separate uppers, no crosstalk."""
    lowers, upper, work, mnt = _two_lowers(shared_tmp)
    upper2, work2, mnt2 = shared_tmp / "upper2", shared_tmp / "work2", shared_tmp / "mnt2"
    for d in (upper2, work2, mnt2):
        d.mkdir()
    a = mount_union(kind, mnt, lowers, upper, work)
    try:
        b = mount_union(kind, mnt2, lowers, upper2, work2)
        try:
            (mnt / "top").write_text("changed in a")
            os.unlink(mnt2 / "bottom")
            (mnt2 / "only-b").write_text("b")
            assert (mnt2 / "top").read_text() == "top\n"
            assert sorted(os.listdir(mnt)) == ["bottom", "top"]
            assert sorted(os.listdir(mnt2)) == ["only-b", "top"]
            assert (lowers[0] / "top").read_text() == "top\n"
        finally:
            b.unmount()
    finally:
        a.unmount()
