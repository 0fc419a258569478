"""A real workload on a recorded store mount, rootless: `sh -c 'python3 /app/hello.py'` inside
bwrap on `fusesnap mount --record`, as an unprivileged user. The record lists what the
start-up read (shell, loader, libraries, interpreter, modules, the app) once each, in
first-access order, with the layers the Recorder API names for the same paths; `record
inspect` adds it up; `fusesnap warm` puts exactly the recorded layer files into the page
cache (checked with fincore after evicting them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_as, script, unmount, user_env
from pyrootfs import APP, PYTHON, layer_tars

pytestmark = pytest.mark.rootless

# Run as the user with the venv's interpreter (the package is installed there for every user).
CHAIN_VIEW = """
import json, sys
from fusesnap.snapshots.recorder import ChainView
from fusesnap.store.layerstore import LayerStore
with LayerStore(sys.argv[1]) as st:
    view = ChainView(st, sys.argv[2])
    out = {}
    for p in json.load(sys.stdin):
        s = view.resolve(p)
        out[p] = [s.layer_index, s.chain_id, s.size, s.src.decode("utf-8", "surrogateescape")]
print(json.dumps(out))
"""


def _bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        pytest.skip("bwrap is not installed (scripts/setup installs bubblewrap)")
    return path


def _resident(paths: list[str]) -> dict[str, int]:
    """Bytes of each file in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--json", "--bytes", "--output", "RES,FILE", *paths], capture_output=True,
                         text=True, check=True).stdout
    return {r["file"]: int(r["res"]) for r in json.loads(out)["fincore"]}


def _evict(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def test_python_start_up_recorded_in_bwrap_then_warmed(test_user, shared_tmp: Path) -> None:
    bwrap = _bwrap()
    pw = test_user
    root = shared_tmp / "store"
    env = user_env(pw, FUSESNAP_ROOT=str(root))

    def fs(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        p = run_as(pw, [script("fusesnap"), *args], env=env, text=True, cwd=shared_tmp)
        if ok:
            assert p.returncode == 0, (args, p.stderr)
        return p

    chain: list[str] = []
    for i, tar in enumerate(layer_tars()):
        f = shared_tmp / f"layer{i}.tar"
        f.write_bytes(tar)
        f.chmod(0o644)
        chain.append(fs("import", *(["--parent", chain[-1]] if chain else []), str(f)).stdout.split()[0])
    top = chain[-1]
    fs("prepare", "run", top)
    mnt, rec = shared_tmp / "mnt", shared_tmp / "rec.jsonl"
    mnt.mkdir()
    os.chown(mnt, pw.pw_uid, pw.pw_gid)
    fs("mount", "--record", str(rec), "run", str(mnt))
    try:
        p = run_as(pw, [bwrap, "--bind", str(mnt), "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all",
                        "--die-with-parent", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
                        "/bin/sh", "-c", "python3 /app/hello.py"], env=env, text=True, timeout=120)
        assert p.returncode == 0 and json.loads(p.stdout) == {"ok": True}, p.stderr
    finally:
        fs("umount", str(mnt))
    entries = [json.loads(line) for line in rec.read_text().splitlines()]
    paths = [e["path"] for e in entries]
    assert len(paths) == len(set(paths))
    py = PYTHON.as_posix().lstrip("/")
    loader = next(p for p in paths if p.startswith("lib64/ld-linux"))
    for must in ("bin/busybox", loader, py, "lib/x86_64-linux-gnu/libc.so.6", "app/hello.py"):
        assert must in paths, (must, paths)
    # first-access order: the shell runs first; execve reads the interpreter's headers, then its
    # loader maps it the libraries; the app comes after them
    assert paths[0] == "bin/busybox"
    libc = paths.index("lib/x86_64-linux-gnu/libc.so.6")
    assert paths.index(py) < paths.index(loader) < libc < paths.index("app/hello.py")
    assert any(p.startswith(f"usr/lib/{PYTHON.name}/json/") for p in paths)
    # the layers: as the Recorder API resolves the same paths in the chain
    lower = [e for e in entries if e["chain_id"] is not None]
    assert all(e["layer_index"] == 3 for e in entries if e["chain_id"] is None)    # files it wrote, if any
    py_env = dict(env, PYTHONDONTWRITEBYTECODE="1")
    p = run_as(pw, [sys.executable, "-c", CHAIN_VIEW, str(root), top], env=py_env, text=True, cwd=shared_tmp,
               input=json.dumps([e["path"] for e in lower]))
    assert p.returncode == 0, p.stderr
    resolved = json.loads(p.stdout)
    for e in lower:
        assert resolved[e["path"]][:3] == [e["layer_index"], e["chain_id"], e["size"]], e
        assert e["chain_id"] == chain[e["layer_index"]]
    by = {e["path"]: e for e in entries}
    assert by["app/hello.py"]["layer_index"] == 2 and by["app/hello.py"]["size"] == len(APP)
    assert by[py]["layer_index"] == 1 and by[py]["size"] == PYTHON.stat().st_size
    assert by["bin/busybox"]["layer_index"] == 0
    # inspect adds it up
    s = json.loads(fs("record", "inspect", "--json", str(rec)).stdout)
    assert (s["files"], s["bytes"]) == (len(entries), sum(e["size"] for e in entries))
    assert {r["layer_index"]: r["files"] for r in s["layers"]} == \
        {i: sum(1 for e in entries if e["layer_index"] == i) for i in {e["layer_index"] for e in entries}}
    # warm: the recorded layer files, and nothing else, come back into the page cache
    srcs = sorted({v[3] for v in resolved.values()})
    other = str(root / "layers" / chain[1][7:] / "fs" / f"usr/lib/{PYTHON.name}/argparse.py")
    assert f"usr/lib/{PYTHON.name}/argparse.py" not in paths
    _evict(srcs + [other])
    before = _resident(srcs + [other])
    big = [s for s in srcs if os.path.getsize(s) > 1 << 20]           # the interpreter, libc
    assert big and all(before[s] == 0 for s in big), before
    w = json.loads(fs("warm", "run", "--record", str(rec), "--json").stdout)
    assert (w["files"], w["missing"]) == (len(srcs), sum(1 for e in entries if e["chain_id"] is None))
    assert w["bytes"] == sum(os.path.getsize(s) for s in srcs)
    after = _resident(srcs + [other])
    assert all(after[s] >= os.path.getsize(s) for s in srcs if os.path.getsize(s)), after
    assert after[other] == 0
    # the image still runs after the warm-up, and warming an unknown target is one line
    fs("mount", "run", str(mnt))
    try:
        p = run_as(pw, [bwrap, "--bind", str(mnt), "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all",
                        "--die-with-parent", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
                        "/bin/sh", "-c", "python3 /app/hello.py"], env=env, text=True, timeout=120)
        assert json.loads(p.stdout) == {"ok": True}, p.stderr
    finally:
        unmount(mnt)
    bad = fs("warm", "nothing", "--record", str(rec), ok=False)
    assert bad.returncode == 1 and bad.stderr.strip() == "fusesnap: error: no snapshot, image or layer named 'nothing'"
