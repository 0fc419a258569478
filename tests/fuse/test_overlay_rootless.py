"""fusesnap-overlay run by an unprivileged user: through fusermount3 in the host's
namespaces, and directly inside `unshare -Urm` (a user namespace mapping the user to root).

One probe process per mode (run as the test user) mounts, runs every check, unmounts, waits for the
daemon to exit and reports JSON; the tests below assert on that report and, as root, on the upper
directory it left behind (whiteout forms a non-root daemon can write, opaque markers, and the
`user.containers.override_stat` xattr that stores metadata it could not apply).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from helpers import is_root, run_as
from unionmount import (OVERRIDE_XATTRS, chown_tree, is_opaque_in_upper, is_whiteout_in_upper, layout,
                        mkfile, mkwhiteout, overlay_cmd, overlay_opts, override_stat, scratch)

pytestmark = [pytest.mark.rootless, pytest.mark.skipif(not is_root(), reason="needs root to create the test user")]

MODES = ["fusermount3", "unshare"]

PROBE = r'''
import errno, json, os, stat, subprocess, sys, time

cmd, opts, mnt, mode = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
R = {}

def mounted():
    with open("/proc/self/mountinfo") as f:
        return any(l.split()[4] == mnt for l in f)

def daemons():
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                args = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
                state = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if mnt.encode() in args and state not in "ZX":
                out.append(int(d))
    return out

def st(p):
    s = os.lstat(p)
    return [s.st_uid, s.st_gid, s.st_mode, s.st_rdev and [os.major(s.st_rdev), os.minor(s.st_rdev)], s.st_nlink, s.st_ino]

def check(name):
    def deco(fn):
        try:
            R[name] = {"ok": True, "value": fn()}
        except Exception as e:
            R[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return fn
    return deco

def err(fn, *a):
    try:
        fn(*a)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok"

P = lambda *a: os.path.join(mnt, *a)
r = subprocess.run(cmd + ["-o", opts, mnt], capture_output=True, text=True, timeout=60)
R["mount"] = {"ok": r.returncode == 0, "rc": r.returncode, "stderr": r.stderr, "live": mounted(),
              "uid": os.getuid()}
if r.returncode == 0 and R["mount"]["live"]:
    pids = daemons()

    @check("listing")
    def _():
        return {d: sorted(os.listdir(P(d))) for d in ("", "d", "opq", "opq2")}

    @check("read")
    def _():
        return [open(P("a")).read(), open(P("b")).read(), open(P("d", "x")).read()]

    @check("hidden")
    def _():
        return [err(os.lstat, P(n)) for n in ("gone", ".wh.gone", "chargone", "opq/h", "opq2/.wh..wh..opq")]

    @check("override_presented")
    def _():
        return {n: st(P(n))[:4] for n in ("ov_c", "ov_f", "ov_dev", "ov_both", "ov_u")}

    @check("override_xattr_hidden")
    def _():
        return sorted(os.listxattr(P("ov_c"))) + sorted(os.listxattr(P("ov_f")))

    @check("dtypes")
    def _():
        import ctypes, struct
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        buf, out = ctypes.create_string_buffer(65536), {}
        while (n := libc.syscall(217, fd, buf, 65536)) > 0:
            pos = 0
            while pos < n:
                _, _, reclen, dtype = struct.unpack_from("<QqHB", buf.raw, pos)
                out[buf.raw[pos + 19:pos + reclen].split(b"\0")[0].decode()] = dtype
                pos += reclen
        os.close(fd)
        return out

    @check("write_copyup")
    def _():
        ino = os.lstat(P("a")).st_ino
        with open(P("a"), "a") as f:
            f.write("+")
        assert os.lstat(P("a")).st_ino == ino, "inode number changed by copy-up"
        return open(P("a")).read()

    @check("posix")
    def _():
        fd = os.open(P("d", "y"), os.O_RDWR)
        os.unlink(P("d", "y"))
        nlink = os.fstat(fd).st_nlink
        os.pwrite(fd, b"B", 0)
        data = os.pread(fd, 10, 0)
        os.close(fd)
        return [nlink, data.decode(), err(os.mkdir, P("n" * 256)), os.statvfs(mnt).f_namemax]

    @check("copyup_keeps_presented_owner")
    def _():
        with open(P("ov_w"), "a") as f:  # presented 0:0 0666: writable by anyone, owned by root
            f.write("+")
        os.chmod(P("ov_u"), 0o711)  # presented as the caller's own file
        return {"ov_w": st(P("ov_w"))[:3] + [open(P("ov_w")).read()], "ov_u": st(P("ov_u"))[:3]}

    @check("delete")
    def _():
        os.unlink(P("d", "x"))
        return [sorted(os.listdir(P("d"))), err(os.lstat, P("d", "x"))]

    @check("mkdir_over_whiteout")
    def _():
        os.unlink(P("dd", "f"))
        os.rmdir(P("dd"))
        os.mkdir(P("dd"))
        return os.listdir(P("dd"))

    @check("chown_and_setuid_own_file")
    def _():
        with open(P("mine"), "w") as f:
            f.write("m")
        os.chown(P("mine"), os.getuid(), os.getgid())
        os.chmod(P("mine"), 0o4711)
        return st(P("mine"))[:3]

    @check("fifo_and_symlink")
    def _():
        os.mkfifo(P("fifo"))
        os.symlink("a", P("lnk"))
        return [stat.S_ISFIFO(os.lstat(P("fifo")).st_mode), os.readlink(P("lnk"))]

    @check("device_mknod")
    def _():
        return err(os.mknod, P("null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))

    @check("xattr")
    def _():
        os.setxattr(P("b"), "user.k", b"v")
        return [os.getxattr(P("b"), "user.k").decode(), "user.k" in os.listxattr(P("b"))]

    @check("hardlink")
    def _():
        os.link(P("b"), P("b2"))
        return [os.lstat(P("b")).st_ino == os.lstat(P("b2")).st_ino, os.lstat(P("b2")).st_nlink]

    @check("rename_lower_dir")
    def _():
        os.rename(P("d2"), P("d3"))
        return [sorted(os.listdir(P("d3"))), err(os.lstat, P("d2"))]

    um = ["fusermount3", "-u", mnt] if mode == "fusermount3" else ["umount", mnt]
    u = subprocess.run(um, capture_output=True, text=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (daemons() or mounted()):
        time.sleep(0.05)
    R["unmount"] = {"ok": u.returncode == 0, "stderr": u.stderr, "daemons_before": pids,
                    "daemons_after": daemons(), "mounted_after": mounted()}
print(json.dumps(R))
'''


def _build(lowers: list[Path], own: tuple[int, int]) -> None:
    """own: the caller's ids as the daemon sees them (the user's, or 0:0 inside unshare -Ur)."""
    l0, l1 = lowers
    mkfile(l1 / "a", "a")
    mkfile(l0 / "b", "b")
    mkfile(l1 / "d" / "x", "x")
    mkfile(l0 / "d" / "y", "y")
    mkfile(l1 / "d2" / "in", "in")
    mkfile(l1 / "dd" / "f", "f")
    mkfile(l1 / "gone", "hidden by .wh.gone")
    mkfile(l0 / ".wh.gone")
    mkfile(l1 / "chargone", "hidden by a char 0/0")
    mkwhiteout(l0 / "chargone")
    mkfile(l1 / "opq" / "h", "hidden")
    mkfile(l0 / "opq" / "mine", "m")
    mkfile(l1 / "opq2" / "h", "hidden")
    mkfile(l0 / "opq2" / "mine", "m")
    mkfile(l0 / "opq2" / ".wh..wh..opq")
    mkfile(l1 / "ov_c", "c", 0o644, xattrs={"user.containers.override_stat": b"0:0:04755"})
    mkfile(l1 / "ov_f", "f", 0o644, xattrs={"user.fuseoverlayfs.override_stat": b"12:34:0640"})
    mkfile(l1 / "ov_dev", "", 0o644, xattrs={"user.containers.override_stat": b"0:0:0620:char-4-1"})
    mkfile(l1 / "ov_w", "w", 0o644, xattrs={"user.containers.override_stat": b"0:0:0666"})
    mkfile(l1 / "ov_u", "u", 0o644, xattrs={"user.containers.override_stat": f"{own[0]}:{own[1]}:04750".encode()})
    mkfile(l1 / "ov_both", "", 0o644, xattrs={"user.containers.override_stat": b"0:0:0600",
                                              "user.fuseoverlayfs.override_stat": b"77:77:0777"})
    for layer in (l0, l1):  # containers/storage marks a layer root too (fuse-overlayfs needs it)
        os.setxattr(layer, "user.containers.override_stat", b"0:0:0755")


@pytest.fixture(scope="module", params=MODES)
def run(request, test_user):
    """(mode, probe report, upper dir, caller ids) of one probe run as the test user."""
    mode = request.param
    with scratch("fusesnap-ovu-") as base:
        lowers, upper, work, mnt = layout(base, 2)
        own = (0, 0) if mode == "unshare" else (test_user.pw_uid, test_user.pw_gid)
        _build(lowers, own)
        os.setxattr(lowers[0] / "opq", "user.fuseoverlayfs.opaque", b"y")
        for d in lowers + [upper, work, mnt]:
            chown_tree(d, test_user.pw_uid, test_user.pw_gid)
        probe = base / "probe.py"
        probe.write_text(PROBE)
        cmd = ["/usr/bin/python3", str(probe), json.dumps(overlay_cmd()), overlay_opts(lowers, upper, work),
               str(mnt), mode]
        if mode == "unshare":
            cmd = ["unshare", "-Urm"] + cmd
        r = run_as(test_user, cmd, text=True, timeout=240)
        assert r.returncode == 0, f"probe crashed: {r.stderr}"
        yield mode, json.loads(r.stdout), upper, own


def _ok(report: dict, name: str):
    assert "mount" in report and report["mount"]["ok"], f"mount failed: {report.get('mount')}"
    res = report.get(name)
    assert res is not None, f"check {name} did not run"
    assert res["ok"], f"{name}: {res['error']}"
    return res["value"]


def test_mounts_unprivileged_and_is_live_on_return(run):
    mode, report, _, _ = run
    m = report["mount"]
    assert m["uid"] != 0 if mode == "fusermount3" else m["uid"] == 0
    assert m["ok"], f"exit {m['rc']}: {m['stderr']}"
    assert m["live"], "the program returned before the mount was live"


def test_daemon_exits_when_unmounted(run):
    _, report, _, _ = run
    _ok(report, "listing")
    un = report["unmount"]
    assert un["ok"], un["stderr"]
    assert un["daemons_before"], "no daemon process found for the mount"
    assert not un["mounted_after"] and not un["daemons_after"], un


def test_merge_whiteouts_and_opaque_markers(run):
    _, report, _, _ = run
    assert _ok(report, "listing") == {
        "": ["a", "b", "d", "d2", "dd", "opq", "opq2", "ov_both", "ov_c", "ov_dev", "ov_f", "ov_u", "ov_w"],
        "d": ["x", "y"], "opq": ["mine"], "opq2": ["mine"]}
    assert _ok(report, "read") == ["a", "b", "x"]
    assert _ok(report, "hidden") == ["ENOENT"] * 5


def _presented_id(mode: str, i: int) -> int:
    # inside `unshare -Ur` only id 0 is mapped: the kernel shows any other id as the overflow id
    return i if mode == "fusermount3" or i == 0 else 65534


def test_override_stat_is_presented(run):
    mode, report, _, _ = run
    got = _ok(report, "override_presented")
    pid = lambda i: _presented_id(mode, i)  # noqa: E731
    assert got["ov_c"] == [0, 0, stat.S_IFREG | 0o4755, 0]
    assert got["ov_f"] == [pid(12), pid(34), stat.S_IFREG | 0o640, 0], "user.fuseoverlayfs.override_stat"
    assert got["ov_dev"] == [0, 0, stat.S_IFCHR | 0o620, [4, 1]], "device type from the override"
    assert got["ov_both"][:3] == [0, 0, stat.S_IFREG | 0o600], "user.containers.override_stat wins"
    assert got["ov_u"][2] == stat.S_IFREG | 0o4750
    assert not set(_ok(report, "override_xattr_hidden")) & set(OVERRIDE_XATTRS)


def test_copy_up_keeps_the_presented_owner(run):
    mode, report, upper, own = run
    assert _ok(report, "write_copyup") == "a+"
    got = _ok(report, "copyup_keeps_presented_owner")
    assert got["ov_w"] == [0, 0, stat.S_IFREG | 0o666, "w+"]
    assert got["ov_u"] == [0 if mode == "unshare" else own[0], 0 if mode == "unshare" else own[1],
                           stat.S_IFREG | 0o711]
    if mode == "fusermount3":  # the daemon cannot chown the copy to root: the xattr must say 0:0
        ov = override_stat(upper / "ov_w")
        assert ov is not None and ov.split(":")[:2] == ["0", "0"], f"upper ov_w override: {ov}"
        assert int(ov.split(":")[2], 8) & 0o7777 == 0o666
    ov = override_stat(upper / "ov_u")
    if ov is not None:  # wherever an override is kept, it must carry the new mode
        assert int(ov.split(":")[2], 8) & 0o7777 == 0o711, ov


def test_deletes_write_whiteouts_a_user_can_create(run):
    _, report, upper, _ = run
    assert _ok(report, "delete") == [[], "ENOENT"]  # d/y was unlinked by the posix check before
    assert is_whiteout_in_upper(upper, "d/x")
    assert _ok(report, "mkdir_over_whiteout") == []
    assert is_opaque_in_upper(upper / "dd")


def test_chown_and_setuid_on_own_files(run, test_user):
    mode, report, upper, own = run
    assert _ok(report, "chown_and_setuid_own_file") == [own[0], own[1], stat.S_IFREG | 0o4711]
    real = os.lstat(upper / "mine")
    assert (real.st_uid, real.st_gid) == (test_user.pw_uid, test_user.pw_gid)


def test_readdir_d_type_follows_presented_type(run):
    _, report, _, _ = run
    got = _ok(report, "dtypes")
    assert got["ov_dev"] == 2, "a regular file presented as a char device must be DT_CHR in readdir"
    assert got["a"] == 8 and got["d"] == 4 and got["."] == 4 and got[".."] == 4


def test_posix_details_as_the_user(run):
    _, report, _, _ = run
    # nlink of an open file after its last unlink, still writable; names > 255 bytes; f_namemax
    assert _ok(report, "posix") == [0, "B", "ENAMETOOLONG", 255]


def test_special_files_xattrs_links_and_lower_dir_rename(run):
    _, report, _, _ = run
    assert _ok(report, "fifo_and_symlink") == [True, "a"]
    assert _ok(report, "device_mknod") == "EPERM"  # the kernel refuses: no CAP_MKNOD
    assert _ok(report, "xattr") == ["v", True]
    assert _ok(report, "hardlink") == [True, 2]
    assert _ok(report, "rename_lower_dir") == [["in"], "ENOENT"]
