"""How `fusesnap mount` and `fusesnap-overlay` start their daemon in their own process.

The console scripts hand such commands to the mount server
(tests/fuse/test_mount_server.py); without it (FUSESNAP_MOUNT_SERVER=0, or
main() called in-process) the daemon is forked before pyfuse3/trio are
imported, so the command's own process never loads them: it parses arguments
and opens the store while the daemon imports on the other core, and returns
once the mount is live. These tests pin the behaviour that must survive both
ways: the command returns with the mount live, errors found by either process
are one line and a non-zero exit, a process that is not needed goes away, and
a bad tree cache falls back to a rebuilt tree. No timings here (scripts/bench.py
measures them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import is_mounted, script, unmount

HEAVY = ("trio", "pyfuse3", "sqlite3")


def fusesnap(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([script("fusesnap"), "--root", str(root), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def _in_python(code: str, *args: str) -> dict:
    """Run code in a fresh interpreter of the venv; it prints one JSON object last."""
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


# Calls a console script's main() in-process, then reports which heavy modules this
# (the caller's) process holds and what the mount shows right after main() returned.
_CALL_MAIN = """
import json, os, sys
module, mp, *argv = sys.argv[1:]
main = __import__(module, fromlist=["main"]).main
rc = main(argv)
live = any(l.split()[4] == mp for l in open("/proc/self/mountinfo"))
names = sorted(os.listdir(mp)) if live else []
print(json.dumps({"rc": rc, "live": live, "names": names,
                  "loaded": [m for m in ("trio", "pyfuse3", "argparse") if m in sys.modules]}))
"""


def _layer_store(tmp: Path) -> tuple[Path, str]:
    """A store with a two-layer chain: /a/one from the base, /b/two from the top."""
    root = tmp / "root"
    chain = ""
    for i, (d, f) in enumerate([("a", "one"), ("b", "two")]):
        src = tmp / f"src{i}"
        (src / d).mkdir(parents=True)
        (src / d / f).write_text(f)
        tar = tmp / f"l{i}.tar"
        subprocess.run(["tar", "-C", str(src), "-cf", str(tar), d], check=True)
        r = fusesnap(root, "import", str(tar), *(["--parent", chain] if chain else []))
        assert r.returncode == 0, r.stderr
        chain = r.stdout.splitlines()[0]
    return root, chain


def test_parsing_and_help_do_not_import_the_fuse_stack():
    code = """
import contextlib, io, json, sys
from fusesnap.cli.main import build_parser, main
build_parser().parse_args(["mount", "k", "/nonexistent"])
with contextlib.redirect_stdout(io.StringIO()):
    for argv in (["--help"], ["mount", "--help"]):
        try:
            main(argv)
        except SystemExit:
            pass
print(json.dumps([m for m in %r if m in sys.modules]))
""" % (HEAVY,)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


# Plain mount command lines main() parses without argparse, and ones it must leave to argparse.
PLAIN = [
    ["mount", "k", "/m"],
    ["--root", "/r", "-vv", "--json", "mount", "k", "/m", "-o", "ro", "-oallow_other,noatime"],
    ["--root=/r", "-v", "--verbose", "mount", "k", "-o", "a=1", "/m", "--json"],
    ["fusesnap", "/m", "-o", "rw,root=/r,snapshot=k", "-o", "dev"],
]
NOT_PLAIN = [
    ["mount", "-f", "k", "/m"], ["mount", "--foreground", "k", "/m"], ["mount", "k", "/m", "--help"],
    ["mount", "k"], ["mount", "k", "/m", "extra"], ["mount", "k", "/m", "-o"], ["mount", "k", "/m", "-o=x"],
    ["mount", "k", "/m", "-o", "-x"], ["--ro", "/r", "mount", "k", "/m"], ["--root", "mount", "k", "/m"],
    ["-h", "mount", "k", "/m"], ["mount", "-v", "k", "/m"], ["mount", "--", "k", "/m"], ["view", "k", "p"],
    ["fusesnap", "/m", "-f"], [],
]


def test_plain_mount_command_lines_parse_as_argparse_does():
    code = """
import json, sys
from fusesnap.cli.mountargs import plain_mount_args as _plain_mount_args
from fusesnap.cli.main import _namespace, build_parser
plain, not_plain = json.loads(sys.argv[1])
out = {"same": [], "loaded_argparse": None, "not_none": []}
fast = [_plain_mount_args(a) for a in plain]
fast = [_namespace(f) if f is not None else None for f in fast]
out["loaded_argparse"] = "argparse" in sys.modules
for a, f in zip(plain, fast):
    ref = vars(build_parser().parse_args(a))
    got = vars(f) if f is not None else None
    out["same"].append(got is not None and {k: str(v) for k, v in got.items()} == {k: str(v) for k, v in ref.items()})
out["not_none"] = [a for a in not_plain if _plain_mount_args(a) is not None]
print(json.dumps(out))
"""
    out = _in_python(code, json.dumps([PLAIN, NOT_PLAIN]))
    assert out["same"] == [True] * len(PLAIN)
    assert out["not_none"] == []
    assert out["loaded_argparse"] is False


def test_snapshot_mount_is_live_on_return_and_caller_never_loads_pyfuse3(shared_tmp):
    root, chain = _layer_store(shared_tmp)
    mp = shared_tmp / "mp"
    mp.mkdir()
    for key, args in (("rw", ("prepare", "rw", chain)), ("ro", ("view", "ro", chain))):
        assert fusesnap(root, *args).returncode == 0
        out = _in_python(_CALL_MAIN, "fusesnap.cli.main", str(mp), "--root", str(root), "mount", key, str(mp))
        try:
            assert out["rc"] == 0
            assert out["live"], "mount returned before the mount was live"
            assert out["names"] == ["a", "b"]
            assert (mp / "a" / "one").read_text() == "one"
            assert out["loaded"] == [], f"the mount command's own process imported {out['loaded']}"
        finally:
            unmount(mp)


def test_overlay_mount_is_live_on_return_and_caller_never_loads_pyfuse3(shared_tmp):
    lower, upper, work, mp = (shared_tmp / n for n in ("lower", "upper", "work", "mp"))
    for d in (lower, upper, work, mp):
        d.mkdir()
    (lower / "f").write_text("x")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    out = _in_python(_CALL_MAIN, "fusesnap.cli.overlay", str(mp), "-o", opts, str(mp))
    try:
        assert out["rc"] == 0 and out["live"] and out["names"] == ["f"]
        assert out["loaded"] == []
    finally:
        unmount(mp)


def test_error_found_by_the_daemon_is_one_line_and_nonzero(shared_tmp):
    """The upper is checked by the daemon (Union), after the command handed it over."""
    root, chain = _layer_store(shared_tmp)
    mp = shared_tmp / "mp"
    mp.mkdir()
    assert fusesnap(root, "prepare", "k", chain).returncode == 0
    uppers = list(root.glob("snapshots/*/upper"))
    assert len(uppers) == 1
    uppers[0].rmdir()
    r = fusesnap(root, "mount", "k", str(mp))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "upper" in lines[0] and str(mp) in lines[0], r.stderr
    assert not is_mounted(mp)


def _processes_naming(path: Path) -> list[int]:
    """Live processes whose command line names path (a daemon keeps its command's, a
    mount server's worker shows the command line it runs)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                if os.fsencode(str(path)) in Path(f"/proc/{d}/cmdline").read_bytes() and \
                        Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX":
                    pids.append(int(d))
            except OSError:
                pass
    return pids


VIA = {"server": {}, "own process": {"FUSESNAP_MOUNT_SERVER": "0"}}


@pytest.mark.parametrize("via", sorted(VIA))
@pytest.mark.parametrize("case", ["committed", "missing-key", "not-a-dir", "usage-error", "helper-no-key"])
def test_error_found_by_the_command_sends_the_daemon_away(shared_tmp, case, via):
    """In its own process a plain command line forks the daemon before these errors are
    found; through the server a worker runs it; the usage error goes through argparse
    (no daemon at all). Nothing that names the store is left running afterwards."""
    root, chain = _layer_store(shared_tmp)
    mp = shared_tmp / "mp"
    mp.mkdir()
    assert fusesnap(root, "prepare", "k", chain).returncode == 0
    assert fusesnap(root, "commit", "c", "k").returncode == 0
    assert fusesnap(root, "prepare", "k2", "c").returncode == 0
    args = {"committed": ["mount", "c", str(mp)], "missing-key": ["mount", "nope", str(mp)],
            "not-a-dir": ["mount", "k2", str(root / "does-not-exist")],
            "usage-error": ["mount", "k2"],
            "helper-no-key": ["fusesnap", str(mp), "-o", f"root={root}"]}[case]
    r = fusesnap(root, *args, env={**os.environ, **VIA[via]})
    assert r.returncode != 0
    if case != "usage-error":      # argparse prints usage + error
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not is_mounted(mp)
    deadline = time.monotonic() + 30
    while _processes_naming(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_naming(root), "a process started for the failed mount is still running"


def test_mount_help_forks_no_daemon(shared_tmp):
    root, chain = _layer_store(shared_tmp)
    r = fusesnap(root, "mount", "--help")
    assert r.returncode == 0 and "MOUNTPOINT" in r.stdout
    assert not _processes_naming(root)


def test_unreadable_tree_cache_falls_back_to_a_rebuilt_tree(shared_tmp):
    root, chain = _layer_store(shared_tmp)
    mp = shared_tmp / "mp"
    mp.mkdir()
    assert fusesnap(root, "prepare", "k", chain).returncode == 0
    assert fusesnap(root, "mount", "k", str(mp)).returncode == 0   # builds and caches the tree
    unmount(mp)
    caches = list((root / "cache" / "lowertrees").iterdir())
    assert caches, "no lower tree cache was written"
    for c in caches:
        c.write_bytes(b"not a marshalled tree")
    r = fusesnap(root, "mount", "k", str(mp))
    try:
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(mp)) == ["a", "b"]
        assert (mp / "b" / "two").read_text() == "two"
    finally:
        unmount(mp)
