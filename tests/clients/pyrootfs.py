"""A small three-layer rootfs that runs Debian's python3, built offline from the host's files:
busybox (as /bin/sh) and the C libraries python needs, then the interpreter and its
standard library, then a tiny app that deletes a file of the layer below."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tarfile
from pathlib import Path

from tarbuild import TarBuilder

PYTHON = Path(os.path.realpath("/usr/bin/python3"))            # /usr/bin/python3.11 on Debian 12
BUSYBOX = Path("/bin/busybox")
# Parts of the standard library no start-up reads and that only make the layer big.
_SKIP = {"config-3.11-x86_64-linux-gnu", "test", "lib2to3", "ensurepip", "pydoc_data", "idlelib", "tkinter",
         "turtledemo", "site-packages", "dist-packages"}
APP = b"import json\nprint(json.dumps({'ok': True}))\n"


def _libs(binary: Path) -> list[str]:
    """The shared objects `ldd` says the binary loads, the dynamic loader included."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def _add_parents(tb: TarBuilder, path: str, seen: set[str]) -> None:
    parts = path.split("/")[:-1]
    for k in range(1, len(parts) + 1):
        d = "/".join(parts[:k])
        if d not in seen:
            seen.add(d)
            tb.add(d, mode=0o755)


def _add_file(tb: TarBuilder, name: str, host: Path, seen: set[str]) -> None:
    _add_parents(tb, name, seen)
    st = host.stat()
    tb.add(name, host.read_bytes(), mode=stat.S_IMODE(st.st_mode))


def _add_tree(tb: TarBuilder, name: str, host: Path, seen: set[str]) -> None:
    _add_parents(tb, name + "/x", seen)
    for dirpath, dirnames, filenames in os.walk(host):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP)
        rel = os.path.relpath(dirpath, host)
        base = name if rel == "." else f"{name}/{rel}"
        for d in dirnames:
            seen.add(f"{base}/{d}")
            tb.add(f"{base}/{d}", mode=0o755)
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if p.is_symlink():
                tb.add(f"{base}/{f}", kind=tarfile.SYMTYPE, link=os.readlink(p))
            elif p.is_file():
                tb.add(f"{base}/{f}", p.read_bytes(), mode=stat.S_IMODE(p.stat().st_mode))


def layer_tars() -> list[bytes]:
    """[base, python, app] layer tars."""
    base, seen = TarBuilder(), set()
    _add_file(base, "bin/busybox", BUSYBOX, seen)
    base.add("bin/sh", kind=tarfile.SYMTYPE, link="busybox")
    for lib in _libs(PYTHON):
        _add_file(base, lib.lstrip("/"), Path(os.path.realpath(lib)), seen)
    for d in ("tmp", "proc", "dev", "etc"):
        base.add(d, mode=0o1777 if d == "tmp" else 0o755)
    base.add("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    py, seen = TarBuilder(), set()
    _add_file(py, PYTHON.as_posix().lstrip("/"), PYTHON, seen)
    py.add("usr/bin/python3", kind=tarfile.SYMTYPE, link=PYTHON.name)
    lib = f"usr/lib/{PYTHON.name}"
    _add_tree(py, lib, Path("/") / lib, seen)
    etc = Path("/etc") / PYTHON.name                     # the stdlib's sitecustomize.py points there
    if etc.is_dir():
        _add_tree(py, f"etc/{PYTHON.name}", etc, seen)
    app = TarBuilder()
    app.add("app", mode=0o755).add("app/hello.py", APP)
    app.add("usr", mode=0o755).add("usr/lib", mode=0o755).add(lib, mode=0o755)
    app.add(f"{lib}/.wh.antigravity.py", b"")
    return [base.data(), py.data(), app.data()]
