"""The mount server (cli/mountserver.py): mount commands run in a fork of a resident process.

What must hold: the command behaves as if it ran in its own process (exit
status, messages, cwd-relative paths, environment, no caller pipe held); its
daemon is a worker of one server per context that shows the command line it
ran; another context (here: another mount namespace) gets a server of its own
and is refused by this one; a server goes when idle and a killed one is
replaced; FUSESNAP_MOUNT_SERVER=0 mounts without any server. No timings here
(scripts/bench.py measures them).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import fuse_daemon, is_mounted, is_root, run_as, script, unmount, user_env, wait_exited
from unionmount import layout, overlay_opts

pytestmark = pytest.mark.skipif(not is_root(), reason="mounts as root (rootless case: run_as)")

SERVER = "fusesnap-mountd"


def _layout(base: Path, name: str = "") -> tuple[str, Path, Path]:
    lowers, upper, work, mp = layout(base / f"m{name}")
    (lowers[0] / "f").write_text("lower\n")
    return overlay_opts(lowers, upper, work), mp, upper


def _overlay(opts: str, mp: Path, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    return subprocess.run([script("fusesnap-overlay"), "-o", opts, str(mp)], text=True, timeout=120, **kw)


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _listening_name(pid: int) -> bytes:
    """The abstract name of the socket server pid listens on (/proc/net/unix)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[6] in inodes and f[7].startswith("@"):
            return b"\0" + f[7][1:].encode()
    raise AssertionError(f"server {pid} listens on no abstract socket")


def test_daemons_are_workers_of_one_server_showing_their_command_line(shared_tmp):
    (opts1, mp1, upper1), (opts2, mp2, _) = _layout(shared_tmp, "1"), _layout(shared_tmp, "2")
    assert _overlay(opts1, mp1).returncode == 0
    assert _overlay(opts2, mp2).returncode == 0
    try:
        d1, d2 = fuse_daemon(mp1), fuse_daemon(mp2)
        server = _ppid(d1)
        assert _comm(server) == SERVER and _ppid(d2) == server, "the daemons were not forked by one server"
        argv = Path(f"/proc/{d1}/cmdline").read_bytes().split(b"\0")
        assert b"-o" in argv and os.fsencode(opts1) in argv, argv
        assert _comm(d1) == "fusesnap-overla"          # the console script's name, cut to 15 bytes
        (mp1 / "new").write_text("x")
        assert (upper1 / "new").read_text() == "x"
    finally:
        unmount(mp1)
        unmount(mp2)
    assert wait_exited(d1) and wait_exited(d2)
    assert not wait_exited(server, 0.5), "the server went with its workers"


def test_without_the_server_the_daemon_is_forked_by_the_command(shared_tmp):
    opts, mp, _ = _layout(shared_tmp)
    r = _overlay(opts, mp, env={**os.environ, "FUSESNAP_MOUNT_SERVER": "0"})
    assert r.returncode == 0, r.stderr
    try:
        d = fuse_daemon(mp)
        assert _comm(_ppid(d)) != SERVER
        assert (mp / "f").read_text() == "lower\n"
    finally:
        unmount(mp)


@pytest.mark.parametrize("case", ["missing-lower", "unknown-snapshot", "helper-without-snapshot"])
def test_failures_read_the_same_through_the_server(shared_tmp, case):
    opts, mp, _ = _layout(shared_tmp)
    root = shared_tmp / "root"
    args = {"missing-lower": [script("fusesnap-overlay"), "-o", opts.replace("/l0,", "/nolower,", 1), str(mp)],
            "unknown-snapshot": [script("fusesnap"), "--root", str(root), "mount", "nope", str(mp)],
            "helper-without-snapshot": [script("fusesnap"), "fusesnap", str(mp), "-o", f"root={root}"]}[case]
    served = subprocess.run(args, capture_output=True, text=True, timeout=120)
    alone = subprocess.run(args, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "FUSESNAP_MOUNT_SERVER": "0"})
    assert served.returncode == alone.returncode != 0
    assert served.stderr == alone.stderr and len(served.stderr.strip().splitlines()) == 1, served.stderr
    assert served.stdout == alone.stdout == ""
    assert not is_mounted(mp)


def test_the_callers_cwd_and_environment_reach_the_command(shared_tmp):
    """Relative lowerdirs (podman's l/ links) resolve in the caller's cwd; FUSESNAP_ROOT
    from the caller's environment picks the store."""
    opts, mp, _ = _layout(shared_tmp)
    rel = opts.replace(f"{shared_tmp}/m/", "")
    r = _overlay(rel, mp, cwd=shared_tmp / "m")
    assert r.returncode == 0, r.stderr
    try:
        assert (mp / "f").read_text() == "lower\n"
    finally:
        unmount(mp)
    root = shared_tmp / "store"
    env = {**os.environ, "FUSESNAP_ROOT": str(root)}
    assert subprocess.run([script("fusesnap"), "prepare", "k"], env=env, capture_output=True).returncode == 0
    r = subprocess.run([script("fusesnap"), "mount", "k", str(mp)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    try:
        assert _comm(_ppid(fuse_daemon(mp))) == SERVER
        (mp / "x").write_text("in the store")
        assert [p.read_text() for p in root.glob("snapshots/*/upper/x")] == ["in the store"]
    finally:
        unmount(mp)


def test_the_caller_reads_its_pipes_to_the_end(shared_tmp):
    """Neither the server nor the daemon keeps a descriptor the caller passed down."""
    opts, mp, _ = _layout(shared_tmp)
    r, w = os.pipe()
    try:
        p = subprocess.Popen([script("fusesnap-overlay"), "-o", opts, str(mp)], pass_fds=(w,),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.close(w)
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        os.set_blocking(r, False)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert os.read(r, 1) == b""    # EOF: nobody holds the write end
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "a process still holds the caller's pipe"
                time.sleep(0.05)
    finally:
        os.close(r)
        unmount(mp)


def _in_namespace(cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", cmd], capture_output=True,
                          text=True, timeout=120, env=env or dict(os.environ))


def test_another_mount_namespace_gets_its_own_server_and_is_refused_by_ours(shared_tmp):
    opts, mp, _ = _layout(shared_tmp)
    assert _overlay(opts, mp).returncode == 0
    ours = _ppid(fuse_daemon(mp))
    unmount(mp)
    name = _listening_name(ours)
    probe = shared_tmp / "probe.py"
    probe.write_text(PEER_PROBE)
    r = _in_namespace(f"{script('fusesnap-overlay')} -o {opts} {mp} && "
                      f"{sys.executable} {probe} {name[1:].hex()} {shared_tmp} && umount {mp}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Nanother context", r.stdout
    assert not (shared_tmp / "peer-ran").exists()
    servers = {p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if _comm(p) == SERVER}
    assert len(servers) >= 2 and ours in servers


# Speaks the mount server's protocol to the server named argv[1] from wherever it runs:
# a command that would leave a file behind if the server ran it.
PEER_PROBE = """
import marshal, os, socket, sys
name, base = b"\\0" + bytes.fromhex(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(name)
req = marshal.dumps((1, "fusesnap-overlay", ["-o", "lowerdir=" + base + "/m/l0," + "upperdir=" + base + "/m/upper,"
                     "workdir=" + base + "/m/work", base + "/peer-ran"], [sys.executable], dict(os.environb), 0o22))
cwd = os.open(".", os.O_PATH)
fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2, cwd))
try:
    s.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
except BrokenPipeError:
    pass                      # refused at once: the answer waits all the same
print(s.recv(100).decode())
"""


def test_a_server_goes_when_idle_and_a_killed_one_is_replaced(shared_tmp):
    """In a namespace of their own, so that these servers serve nobody else."""
    opts, mp, _ = _layout(shared_tmp)
    pids = shared_tmp / "pids"
    show = (f"for p in /proc/[0-9]*; do grep -qx {SERVER} $p/comm 2>/dev/null && "
            '[ "$(readlink $p/ns/mnt)" = "$(readlink /proc/$$/ns/mnt)" ] && echo ${p#/proc/}; done')
    r = _in_namespace(f"""
set -e
{script('fusesnap-overlay')} -o {opts} {mp}
cat {mp}/f
{show} > {pids}
sleep 4
{show} >> {pids}.after
cat {mp}/f
umount {mp}
{script('fusesnap-overlay')} -o {opts} {mp}
umount {mp}
""", env={**os.environ, "FUSESNAP_MOUNT_SERVER_IDLE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["lower", "lower"], r.stdout
    before = set(pids.read_text().split())
    after = set(Path(f"{pids}.after").read_text().split())
    assert before and not after, "the idle server is still there"

    # a killed server: the next mount starts another
    r = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                          f"{script('fusesnap-overlay')} -o {opts} {mp} && umount {mp} && echo ready && read x && "
                          f"{script('fusesnap-overlay')} -o {opts} {mp} && cat {mp}/f && umount {mp}"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert r.stdout.readline() == "ready\n"
        ns = _ns(r.pid)
        assert ns != _ns(os.getpid())
        mine = {p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if _comm(p) == SERVER and _ns(p) == ns}
        assert mine, "no server started in the namespace"
        for p in mine:
            os.kill(p, signal.SIGKILL)
        out, err = r.communicate("\n", timeout=60)
        assert r.returncode == 0, err
        assert out.split() == ["lower"]
    finally:
        if r.poll() is None:
            r.kill()


def test_a_server_goes_with_the_last_other_process_of_its_mount_namespace(shared_tmp):
    """It would otherwise keep the namespace, and the mounts copied into it, alive."""
    opts, mp, _ = _layout(shared_tmp)
    r = _in_namespace(f"{script('fusesnap-overlay')} -o {opts} {mp} && umount {mp} && readlink /proc/$$/ns/mnt")
    assert r.returncode == 0, r.stderr
    ns = r.stdout.strip()
    assert ns and ns != _ns(os.getpid())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = [p for p in map(int, filter(str.isdigit, os.listdir("/proc"))) if _ns(p) == ns]
        if not left:
            return
        time.sleep(0.2)
    pytest.fail(f"processes {left} ({[_comm(p) for p in left]}) keep the ended namespace {ns}")


def _ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


@pytest.mark.rootless
def test_another_user_is_refused_by_roots_server(shared_tmp, test_user):
    opts, mp, _ = _layout(shared_tmp)
    assert _overlay(opts, mp).returncode == 0
    server = _ppid(fuse_daemon(mp))
    unmount(mp)
    probe = shared_tmp / "probe.py"
    probe.write_text(PEER_PROBE)
    os.chmod(probe, 0o644)
    r = run_as(test_user, ["/usr/bin/python3", str(probe), _listening_name(server)[1:].hex(), str(shared_tmp)],
               text=True, timeout=60, env=user_env(test_user))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Nanother user", r.stdout
    assert not (shared_tmp / "peer-ran").exists()


@pytest.mark.rootless
def test_an_unprivileged_user_has_a_server_of_its_own(shared_tmp, test_user):
    opts, mp, _ = _layout(shared_tmp)
    for d in ("upper", "work", "mnt"):
        os.chown(shared_tmp / "m" / d, test_user.pw_uid, test_user.pw_gid)
    r = run_as(test_user, [script("fusesnap-overlay"), "-o", opts, str(mp)], text=True, timeout=120,
               env=user_env(test_user))
    assert r.returncode == 0, r.stderr
    try:
        d = fuse_daemon(mp)
        server = _ppid(d)
        assert _comm(server) == SERVER
        assert os.stat(f"/proc/{server}").st_uid == test_user.pw_uid
        assert os.stat(f"/proc/{d}").st_uid == test_user.pw_uid
    finally:
        run_as(test_user, ["fusermount3", "-u", str(mp)])
        if is_mounted(mp):
            unmount(mp)
