"""Plain helpers shared by tests: console scripts, unprivileged users, mounts."""

from __future__ import annotations

import io
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

TEST_USER = "fusesnap-test"


def script(name: str) -> str:
    """Absolute path of a console script installed next to the running interpreter."""
    p = Path(sys.executable).parent / name
    if p.exists():
        return str(p)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"console script {name!r} not installed (run scripts/setup)")
    return found


def is_root() -> bool:
    return os.geteuid() == 0


def ensure_test_user() -> pwd.struct_passwd:
    """Create the unprivileged test user if needed and make /dev/fuse usable by it."""
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        home = f"/var/tmp/{TEST_USER}-home"
        subprocess.run(
            ["useradd", "--system", "--create-home", "--home-dir", home, "--shell", "/bin/sh", TEST_USER],
            check=True,
        )
        pw = pwd.getpwnam(TEST_USER)
    os.makedirs(pw.pw_dir, exist_ok=True)
    os.chown(pw.pw_dir, pw.pw_uid, pw.pw_gid)
    if os.path.exists("/dev/fuse"):
        os.chmod("/dev/fuse", 0o666)
    return pw


def user_env(pw: pwd.struct_passwd, **extra: str) -> dict[str, str]:
    env = {
        "HOME": pw.pw_dir,
        "USER": pw.pw_name,
        "LOGNAME": pw.pw_name,
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    return env


def run_as(pw: pwd.struct_passwd, cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run cmd as the unprivileged user (real uid/gid switch, no supplementary groups)."""
    env = kw.pop("env", None) or user_env(pw)
    kw.setdefault("capture_output", True)
    return subprocess.run(cmd, user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], env=env, **kw)


def is_mounted(path: str | os.PathLike) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == target:
                return True
    return False


def unmount(path: str | os.PathLike, timeout: float = 10.0) -> None:
    """Unmount a FUSE (or any) mount and wait until it is gone."""
    path = str(path)
    if not is_mounted(path):
        return
    for cmd in (["fusermount3", "-u", path], ["umount", path], ["umount", "-l", path]):
        subprocess.run(cmd, capture_output=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not is_mounted(path):
                return
            time.sleep(0.02)
    raise RuntimeError(f"could not unmount {path}")


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """pred()'s first true value, polled every 50 ms; RuntimeError naming `what` (and the
    tail of `log`) after `timeout` seconds, or as soon as `proc` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not happen within {timeout}s\n{tail}")


def wait_mounted(path: str | os.PathLike, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(path):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{path} did not get mounted")


def fusesnap_ok(root: str | os.PathLike, *args: str, **kw) -> str:
    """Run `fusesnap --root ROOT ARGS...`; its stdout, after asserting it succeeded."""
    r = subprocess.run([script("fusesnap"), "--root", str(root), *args], capture_output=True, text=True,
                       timeout=120, **kw)
    assert r.returncode == 0, r.stderr
    return r.stdout


def fuse_daemon(mountpoint: str | os.PathLike, timeout: float = 10.0) -> int:
    """The process serving a FUSE mount: it holds /dev/fuse and names the mount point in
    its command line."""
    want = os.fsencode(str(mountpoint))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
                if want in argv and any(os.readlink(f"/proc/{d}/fd/{fd}") == "/dev/fuse"
                                        for fd in os.listdir(f"/proc/{d}/fd")):
                    return int(d)
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError(f"no daemon serves {mountpoint}")


def wait_exited(pid: int, timeout: float = 15.0) -> bool:
    """Wait until pid has exited (a zombie counts); False if it still runs after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def one_file_tar(name: str, data: bytes) -> bytes:
    """A tar holding one regular file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()
