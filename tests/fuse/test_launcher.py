"""The console scripts' compiled launcher (cli/launcher.c, installed by cli/launcher.py).

What must hold: scripts/setup put it in place of `fusesnap` and `fusesnap-overlay`;
it finds the very server the Python client starts (same socket name: same context,
same install), hands it the command lines cli/entry.py would hand it, and reports
the exit status; every other command line (no server, FUSESNAP_MOUNT_SERVER=0,
arguments it does not encode) runs through the console script, with the same
result as the script alone. Its decisions are read from FUSESNAP_LAUNCHER_TRACE=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fusesnap.cli import launcher
from fusesnap.cli.mountargs import helper_source, overlay_daemonizes, plain_mount_args
from helpers import fuse_daemon, is_mounted, is_root, script, unmount
from unionmount import layout, overlay_opts

pytestmark = pytest.mark.skipif(not is_root(), reason="mounts as root")

SERVED = "fusesnap-overlay: launcher: served by the mount server"
SERVER = "fusesnap-mountd"


@pytest.fixture(scope="module")
def launchers(tmp_path_factory) -> dict[str, Path]:
    """Launchers built from this checkout's installed console scripts, in a directory of their own."""
    bindir = tmp_path_factory.mktemp("launcher")
    out = {}
    for command in launcher.COMMANDS:
        installed = Path(script(command))
        kept = launcher.kept(installed)
        shutil.copyfile(kept if kept.exists() else installed, bindir / command)
        out[command] = launcher.install(bindir, command)
    return out


@pytest.fixture(scope="module")
def built(launchers) -> Path:
    return launchers["fusesnap-overlay"]


def _layout(base: Path, name: str = "") -> tuple[str, Path]:
    lowers, upper, work, mp = layout(base / f"m{name}")
    (lowers[0] / "f").write_text("lower\n")
    return overlay_opts(lowers, upper, work), mp


def _run(prog: Path | str, args: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "FUSESNAP_LAUNCHER_TRACE": "1", **(env or {})}
    return subprocess.run([str(prog), *args], capture_output=True, text=True, timeout=120, env=env, **kw)


def _trace(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if ": launcher: " in line]


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


@pytest.mark.parametrize("command", launcher.COMMANDS)
def test_setup_installed_the_launcher_in_place_of_the_console_script(command):
    installed = Path(script(command))
    assert installed.read_bytes()[:4] == b"\x7fELF", f"{command} is not the launcher: run scripts/setup"
    assert launcher.kept(installed).read_bytes()[:2] == b"#!"


def test_a_mount_is_handed_to_the_server_the_python_client_started(built, shared_tmp):
    """A new context (another oom_score_adj: part of procctx.context) has no server:
    the launcher falls back, the console script starts one under the name it computes,
    and the next mount finds that server from C."""
    def other_context() -> None:
        Path("/proc/self/oom_score_adj").write_text("7")

    env = {"FUSESNAP_MOUNT_SERVER_IDLE": "3"}
    (opts1, mp1), (opts2, mp2) = _layout(shared_tmp, "1"), _layout(shared_tmp, "2")
    first = _run(built, ["-o", opts1, str(mp1)], env, preexec_fn=other_context)
    try:
        assert first.returncode == 0, first.stderr
        assert _trace(first) == ["fusesnap-overlay: launcher: fallback: no mount server listening"]
        second = _run(built, ["-o", opts2, str(mp2)], env, preexec_fn=other_context)
        assert second.returncode == 0, second.stderr
        assert _trace(second) == [SERVED]
        d1, d2 = fuse_daemon(mp1), fuse_daemon(mp2)
        server = _ppid(d2)
        assert _comm(server) == SERVER and _ppid(d1) == server
        assert Path(f"/proc/{server}/oom_score_adj").read_text().strip() == "7"
        assert (mp2 / "f").read_text() == "lower\n"
        # the daemon shows the command as a console script's process would
        argv = Path(f"/proc/{d2}/cmdline").read_bytes().split(b"\0")
        assert argv[1] == os.fsencode(built) and os.fsencode(opts2) in argv, argv
    finally:
        for mp in (mp1, mp2):
            if is_mounted(mp):
                unmount(mp)


def test_cwd_environment_and_closed_stdin_reach_the_command(built, shared_tmp):
    opts, mp = _layout(shared_tmp)
    _run(built, ARGVS["mount"])          # a server runs from here on
    rel = opts.replace(f"{shared_tmp}/m/", "")
    r = _run(built, ["-o", rel, str(mp)], cwd=shared_tmp / "m", preexec_fn=lambda: os.close(0))
    assert r.returncode == 0, r.stderr
    try:
        assert _trace(r) == [SERVED], r.stderr
        assert (mp / "f").read_text() == "lower\n"
    finally:
        unmount(mp)


ARGVS = {
    "mount": ["-o", "lowerdir=/nonexistent/l,upperdir=/nonexistent/u,workdir=/nonexistent/w", "/nonexistent/m"],
    "debug option": ["-o", "lowerdir=/nonexistent/l,debug", "/nonexistent/m"],
    "attached debug option": ["-odebug,lowerdir=/nonexistent/l", "/nonexistent/m"],
    "-d": ["-d", "-o", "lowerdir=/nonexistent/l", "/nonexistent/m"],
    "version": ["--version"],
    "help": ["-h"],
    "nothing": [],
    "non-ASCII": ["-o", "lowerdir=/nonexistent/lé,upperdir=/nonexistent/u,workdir=/nonexistent/w", "/nonexistent/m"],
}


NOT_A_DIR = "/proc/version/r"      # a store root nothing can create: every mount fails at once
FUSESNAP_ARGVS = {
    "mount": ["--root", NOT_A_DIR, "mount", "k", "/nonexistent/m"],
    "flags first": [f"--root={NOT_A_DIR}", "-v", "--json", "mount", "k", "/nonexistent/m", "-o", "ro"],
    "helper form": ["fusesnap", "/nonexistent/m", "-o", f"root={NOT_A_DIR},snapshot=k"],
    "helper form, source made absolute": ["/nonexistent/fusesnap", "/nonexistent/m", "-o",
                                          f"root={NOT_A_DIR},snapshot=k"],
    "foreground": ["--root", NOT_A_DIR, "mount", "k", "/nonexistent/m", "-f"],
    "one positional": ["--root", NOT_A_DIR, "mount", "k"],
    "another command": ["--root", NOT_A_DIR, "--help"],
    "version": ["--version"],
    "non-ASCII": ["--root", NOT_A_DIR, "mount", "ké", "/nonexistent/m"],
}
CASES = [("fusesnap-overlay", c) for c in ARGVS] + [("fusesnap", c) for c in FUSESNAP_ARGVS]


@pytest.mark.parametrize("command,case", CASES)
def test_what_goes_to_the_server_and_the_result_match_the_console_script(launchers, command, case):
    prog = launchers[command]
    argv = (ARGVS if command == "fusesnap-overlay" else FUSESNAP_ARGVS)[case]
    _run(launchers["fusesnap-overlay"], ARGVS["mount"])          # a server runs from here on
    r = _run(prog, argv)
    alone = subprocess.run([str(launcher.kept(prog)), *argv], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "FUSESNAP_MOUNT_SERVER": "0"})
    goes = overlay_daemonizes(argv) if command == "fusesnap-overlay" else \
        plain_mount_args(helper_source(argv)) is not None
    assert (_trace(r) == [f"{command}: launcher: served by the mount server"]) == (goes and case != "non-ASCII"), \
        _trace(r)
    assert r.returncode == alone.returncode
    assert [line for line in r.stderr.splitlines() if line not in _trace(r)] == alone.stderr.splitlines()
    assert r.stdout == alone.stdout


def test_a_store_mount_is_handed_to_the_server(launchers, shared_tmp):
    root, mp = shared_tmp / "store", shared_tmp / "mp"
    mp.mkdir()
    fusesnap = launchers["fusesnap"]
    assert subprocess.run([str(fusesnap), "--root", str(root), "prepare", "k"], capture_output=True).returncode == 0
    _run(launchers["fusesnap-overlay"], ARGVS["mount"])          # a server runs from here on
    r = _run(fusesnap, ["--root", str(root), "mount", "k", str(mp)])
    assert r.returncode == 0, r.stderr
    try:
        assert _trace(r) == ["fusesnap: launcher: served by the mount server"]
        assert _comm(_ppid(fuse_daemon(mp))) == SERVER
        (mp / "x").write_text("in the store")
        assert [p.read_text() for p in root.glob("snapshots/*/upper/x")] == ["in the store"]
    finally:
        unmount(mp)


def test_the_switch_keeps_every_mount_out_of_the_server(built, shared_tmp):
    opts, mp = _layout(shared_tmp)
    r = _run(built, ["-o", opts, str(mp)], {"FUSESNAP_MOUNT_SERVER": "0"})
    assert r.returncode == 0, r.stderr
    try:
        assert _trace(r) == ["fusesnap-overlay: launcher: fallback: FUSESNAP_MOUNT_SERVER=0"]
        assert _comm(_ppid(fuse_daemon(mp))) != SERVER
    finally:
        unmount(mp)


def test_install_keeps_the_console_script_and_refuses_anything_else(tmp_path, built):
    assert launcher.install(built.parent, built.name) == built             # again: the kept script stays
    assert launcher.kept(built).read_bytes()[:2] == b"#!"
    target = tmp_path / "fusesnap-overlay"
    target.write_bytes(b"\x7fELF not a script")
    with pytest.raises(launcher.LauncherError, match="is not the console script"):
        launcher.install(tmp_path, target.name)
    target.write_text("#!/nonexistent/python\n")
    with pytest.raises(launcher.LauncherError, match="running /nonexistent/python"):
        launcher.install(tmp_path, target.name)
    assert not target.read_text().startswith("\x7fELF")
    r = subprocess.run([sys.executable, "-I", "-m", "fusesnap.cli.launcher", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 2, r.stderr     # one line per command
    assert all(line.startswith("fusesnap: launcher of ") for line in r.stderr.splitlines())


def test_pip_uninstall_takes_the_launchers_and_the_kept_scripts(tmp_path):
    """In a venv of its own: pip installs the package, the launchers go in, and
    `pip uninstall` leaves nothing of fusesnap in bin/ (the kept scripts are in RECORD)."""
    venv, wheels = tmp_path / "venv", tmp_path / "wheels"
    repo = Path(__file__).resolve().parents[2]
    base_python = getattr(sys, "_base_executable", sys.executable)

    def run(*argv: object) -> None:
        r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    run(base_python, "-m", "venv", venv)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, repo)
    run(venv / "bin/pip", "install", "-q", "--no-deps", *wheels.glob("fusesnap-*.whl"))
    run(venv / "bin/python", "-I", "-m", "fusesnap.cli.launcher", venv / "bin")
    run(venv / "bin/python", "-I", "-m", "fusesnap.cli.launcher", venv / "bin")     # again: recorded once
    bindir = venv / "bin"
    assert sorted(p.name for p in (bindir / launcher.KEPT_DIR).iterdir()) == sorted(launcher.COMMANDS)
    assert (bindir / "fusesnap").read_bytes()[:4] == b"\x7fELF"
    run(venv / "bin/pip", "uninstall", "-y", "-q", "fusesnap")
    left = [p.name for p in bindir.iterdir() if "fusesnap" in p.name]
    assert left == [], left


def test_c_string_escapes_everything_but_plain_ascii():
    assert launcher.c_string('a"b\\c?\n\x7fé') == '"a\\042b\\134c\\077\\012\\177\\303\\251"'


def _other_context() -> None:
    Path("/proc/self/oom_score_adj").write_text("9")


@pytest.mark.parametrize("answer,status", [(b"R-1", 255), (b"R256", 0), (b"R3", 3)])
def test_an_exit_status_is_kept_as_exit_would_keep_it_and_never_reruns_the_command(built, answer, status):
    """The protocol's end, against a stand-in server on the launcher's socket name (in a
    context of its own, so that no real server holds the name): whatever status a
    worker reports, the launcher exits with it cut to 8 bits, as the Python client's
    os._exit does, and never falls back on the script, which would run it again."""
    import socket
    import threading

    python = launcher.kept(built).read_text().split("\n", 1)[0][2:]      # the script's, as the name has it
    name = subprocess.run([python, "-I", "-c", "import sys\nfrom fusesnap.cli import mountclient\n"
                           "sys.stdout.write(mountclient.socket_name().hex())"],
                          capture_output=True, text=True, preexec_fn=_other_context, check=True).stdout
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(bytes.fromhex(name))
    srv.listen(1)
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 8)
            got.append(msg)
            for fd in fds:
                os.close(fd)
            conn.send(b"S")
            conn.send(answer)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        # (a launcher that wrongly fell back would start a real server here: gone in 1 s)
        r = _run(built, ARGVS["mount"], {"FUSESNAP_MOUNT_SERVER_IDLE": "1"}, preexec_fn=_other_context)
    finally:
        t.join(10)
        srv.close()
    assert got and got[0][:1] == b"(", "the launcher did not send its request"
    assert r.returncode == status
    assert _trace(r) == [SERVED], r.stderr
