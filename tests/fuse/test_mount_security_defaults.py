"""Mounts are nodev,nosuid and for their owner alone, root's too (issue 13, item 7).

Root mounts an image that holds a 0666 character device (1,5, what /dev/zero is)
and a setuid-root copy of id(1), with `fusesnap-overlay` and with a store-backed
`fusesnap mount`; an unprivileged user then tries to open the device and run the
binary. Only the options `allow_other`, `dev` and `suid`, asked for, let them
through. Root of a user namespace gets allow_other and suid by default (rootless
podman's mount program cannot pass suid; the kernel keeps both inside the
namespace).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from helpers import fusesnap_ok, is_root, run_as, script, unmount, user_env

pytestmark = [pytest.mark.rootless, pytest.mark.skipif(not is_root(), reason="root mounts the image")]

ZERO = os.makedev(1, 5)

# Run as the other user: list the mount, read a file, open the device, run the setuid binary.
PROBE = r"""
import json, os, subprocess, sys
m = sys.argv[1]
def t(f):
    try:
        return ["ok", f()]
    except OSError as e:
        return [e.errno, None]
out = {"list": t(lambda: sorted(os.listdir(m))),
       "read": t(lambda: open(m + "/hello").read()),
       "dev": t(lambda: len(open(m + "/zero", "rb").read(4)))}
try:
    out["euid"] = subprocess.run([m + "/id", "-u"], capture_output=True, text=True).stdout.strip()
except OSError as e:
    out["euid"] = e.errno
print(json.dumps(out))
"""


def _overlay(base: Path, opts: list[str]) -> Path:
    lower, upper, work, mnt = (base / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir(exist_ok=True)
    (lower / "hello").write_text("hello\n")
    os.mknod(lower / "zero", 0o20666, ZERO)
    os.chmod(lower / "zero", 0o666)
    shutil.copy2("/usr/bin/id", lower / "id")
    os.chmod(lower / "id", 0o4755)
    o = ",".join([f"lowerdir={lower},upperdir={upper},workdir={work}"] + opts)
    r = subprocess.run([script("fusesnap-overlay"), "-o", o, str(mnt)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return mnt


def _image_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(ti: tarfile.TarInfo, data: bytes | None = None) -> None:
            ti.uid = ti.gid = 0
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)

        hello = tarfile.TarInfo("hello")
        hello.size, hello.mode = 6, 0o644
        add(hello, b"hello\n")
        zero = tarfile.TarInfo("zero")
        zero.type, zero.mode, zero.devmajor, zero.devminor = tarfile.CHRTYPE, 0o666, 1, 5
        add(zero)
        body = Path("/usr/bin/id").read_bytes()
        ident = tarfile.TarInfo("id")
        ident.size, ident.mode = len(body), 0o4755
        add(ident, body)
    return buf.getvalue()


def _store(base: Path, opts: list[str]) -> Path:
    root, mnt, tar = base / "root", base / "mnt", base / "image.tar"
    mnt.mkdir(exist_ok=True)
    tar.write_bytes(_image_tar())

    chain = fusesnap_ok(root, "import", str(tar)).split()[0]
    fusesnap_ok(root, "prepare", "k", chain)
    fusesnap_ok(root, "mount", "k", str(mnt), *(["-o", ",".join(opts)] if opts else []))
    return mnt


MOUNTERS = {"fusesnap-overlay": _overlay, "fusesnap-mount": _store}


def _flags(mnt: Path) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        line = next(x for x in f if x.split()[4] == str(mnt))
    left, _, right = line.partition(" - ")
    return set(left.split()[5].split(",")) | set(right.split()[2].split(","))


def _probe(user, mnt: Path) -> dict:
    r = run_as(user, ["/usr/bin/python3", "-c", PROBE, str(mnt)], text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("how", sorted(MOUNTERS))
def test_root_mount_keeps_devices_and_setuid_from_other_users(shared_tmp, test_user, how):
    mnt = MOUNTERS[how](shared_tmp, [])
    try:
        flags = _flags(mnt)
        assert {"nodev", "nosuid"} <= flags and "allow_other" not in flags, flags
        out = _probe(test_user, mnt)
        assert out["list"][0] == 13 and out["read"][0] == 13, out    # EACCES: not their mount
    finally:
        unmount(mnt)


@pytest.mark.parametrize("how", sorted(MOUNTERS))
def test_allow_other_alone_lets_files_through_but_not_devices_or_setuid(shared_tmp, test_user, how):
    mnt = MOUNTERS[how](shared_tmp, ["allow_other"])
    try:
        assert {"nodev", "nosuid", "allow_other"} <= _flags(mnt)
        out = _probe(test_user, mnt)
        assert out["list"] == ["ok", ["hello", "id", "zero"]] and out["read"] == ["ok", "hello\n"], out
        assert out["dev"][0] == 13, out                       # EACCES: nodev
        assert out["euid"] == str(test_user.pw_uid), out       # the setuid bit is ignored
    finally:
        unmount(mnt)


@pytest.mark.parametrize("how", sorted(MOUNTERS))
def test_dev_and_suid_work_when_asked(shared_tmp, test_user, how):
    mnt = MOUNTERS[how](shared_tmp, ["allow_other", "dev", "suid"])
    try:
        flags = _flags(mnt)
        assert not {"nodev", "nosuid"} & flags, flags
        out = _probe(test_user, mnt)
        assert out["dev"] == ["ok", 4] and out["euid"] == "0", out
    finally:
        unmount(mnt)


def test_root_of_a_user_namespace_gets_allow_other_and_suid(shared_tmp, test_user):
    """What rootless podman's mount program gets: the kernel confines both to the namespace."""
    lower, upper, work, mnt = (shared_tmp / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, work, mnt):
        d.mkdir()
        os.chown(d, test_user.pw_uid, test_user.pw_gid)
    o = f"lowerdir={lower},upperdir={upper},workdir={work}"
    show = "grep ' {m} ' /proc/self/mountinfo; umount {m}"
    cmd = (f"{script('fusesnap-overlay')} -o {o} {mnt} && {show.format(m=mnt)} && "
           f"{script('fusesnap-overlay')} -o {o},nosuid {mnt} && {show.format(m=mnt)}")
    r = run_as(test_user, ["unshare", "-Urm", "sh", "-c", cmd], text=True, timeout=120, env=user_env(test_user))
    assert r.returncode == 0, r.stderr
    default, asked = r.stdout.splitlines()
    assert "allow_other" in default and "nosuid" not in default.split(" - ")[0], default
    assert "nosuid" in asked.split(" - ")[0], asked
