"""Build and install the console scripts' launcher (cli/launcher.c) in their place.

`python -I -m fusesnap.cli.launcher BINDIR` (scripts/setup runs it for the venv)
compiles the launcher once for `fusesnap` and once for `fusesnap-overlay`, for
the interpreter each console script names, moves the script pip wrote to
BINDIR/.fusesnap-scripts/COMMAND (what the launcher falls back on) and puts the
launcher at BINDIR/COMMAND. A mount that goes to the mount server then starts no
interpreter at all (docs/ARCHITECTURE.md, "The launcher"). Reinstalling the
package with pip puts the console scripts back, which work as before, only
slower; running this again puts the launchers back. The kept scripts are added
to the package's RECORD, so that `pip uninstall` takes them with it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("launcher.c")
COMMANDS = ("fusesnap", "fusesnap-overlay")
KEPT_DIR = ".fusesnap-scripts"


class LauncherError(Exception):
    """The launcher cannot be built or installed (one line for the user)."""


def kept(command_path: Path) -> Path:
    """Where the console script goes: BINDIR/.fusesnap-scripts/COMMAND. Its own name, so
    that the daemons it starts show it; in a directory of its own, because Python puts a
    script's directory first on sys.path (a `fusesnap.py` beside it would hide the package)."""
    return command_path.parent / KEPT_DIR / command_path.name


def c_string(value: str) -> str:
    """A C string literal of value's bytes, with everything but plain ASCII escaped."""
    out = []
    for b in os.fsencode(value):
        out.append(chr(b) if 0x20 <= b < 0x7F and chr(b) not in '"\\?' else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def header(command: str, script: Path) -> str:
    """launcher_build.h: the command and the install this launcher belongs to, as the
    console script `script` sees it (its interpreter, that interpreter's version and
    client module: the parts of mountclient.socket_name's install identity)."""
    line = script.read_bytes().split(b"\n", 1)[0]
    python = os.fsdecode(line[2:].strip())
    if not line.startswith(b"#!/") or " " in python:
        raise LauncherError(f"{script}: not a console script's first line: {line[:80]!r}")
    # -I: the module the script imports, not one in the current directory
    probe = "import sys, fusesnap.cli.mountclient as m; print(sys.version); print(m.__file__)"
    try:
        p = subprocess.run([python, "-I", "-c", probe], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LauncherError(f"running {python}: {e}") from None
    out = os.fsdecode(p.stdout).rstrip("\n").rsplit("\n", 1)
    if p.returncode != 0 or len(out) != 2:
        raise LauncherError(f"{python} cannot import fusesnap.cli.mountclient")
    version, client = out
    values = {"FUSESNAP_KIND": command, "FUSESNAP_PYTHON": python, "FUSESNAP_PYVERSION": version,
              "FUSESNAP_CLIENT": client, "FUSESNAP_SCRIPT": str(script)}
    return "".join(f"#define {k} {c_string(v)}\n" for k, v in values.items())


def build(out: Path, command: str, script: Path) -> None:
    """Compile the launcher of `command` to out, for and falling back on the console script `script`."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise LauncherError("no C compiler (cc) found")
    with tempfile.TemporaryDirectory(prefix="fusesnap-launcher-") as tmp:
        Path(tmp, "launcher_build.h").write_text(header(command, script))
        p = subprocess.run([cc, "-O2", "-Wall", "-I", tmp, "-o", str(out), str(SOURCE)],
                           capture_output=True, text=True)
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines() or [f"exit status {p.returncode}"]
        first = next((line for line in lines if "error" in line), lines[-1])   # not gcc's caret lines
        raise LauncherError(f"compiling {SOURCE.name} failed: {first.strip()}")
    out.chmod(0o755)


def install(bindir: Path, command: str) -> Path:
    """Put the launcher at bindir/command, the console script there (if it is one) at
    kept(); the launcher's path."""
    target = bindir / command
    script = kept(target)
    try:
        with open(target, "rb") as f:
            is_script = f.read(2) == b"#!"
    except FileNotFoundError:
        is_script = False
    except OSError as e:
        raise LauncherError(f"{target}: {e.strerror}") from None
    if not is_script and not script.exists():
        raise LauncherError(f"{target} is not the console script pip installs, and {script} does not exist")
    tmp = bindir / f".{command}.launcher-{os.getpid()}"
    try:
        if is_script:
            script.parent.mkdir(mode=0o755, exist_ok=True)
            shutil.copyfile(target, tmp)
            tmp.chmod(0o755)
            os.replace(tmp, script)
        build(tmp, command, script)
        os.replace(tmp, target)
    except OSError as e:
        raise LauncherError(f"installing into {bindir}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    _record(target, script)
    return target


def _record(target: Path, script: Path) -> None:
    """Add the kept script to the RECORD of the installation whose console script `target`
    was (this package's dist-info), unless it is there: `pip uninstall` then removes it
    with the rest. Nothing is changed where no RECORD lists `target`."""
    site = Path(__file__).resolve().parents[2]
    for record in site.glob("fusesnap-*.dist-info/RECORD"):
        try:
            text = record.read_text()
            rel = os.path.relpath(target, site)
            listed = {line.split(",", 1)[0] for line in text.splitlines()}
            if rel not in listed:
                continue
            kept_rel = os.path.relpath(script, site)
            if kept_rel not in listed:
                with open(record, "a") as f:
                    f.write(("" if text.endswith("\n") or not text else "\n") + f"{kept_rel},,\n")
        except OSError as e:
            raise LauncherError(f"{record}: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -I -m fusesnap.cli.launcher",
        description="Install the compiled launcher of fusesnap and fusesnap-overlay into BINDIR (where pip "
                    "put their console scripts, kept in BINDIR/.fusesnap-scripts): mounts handed to the mount "
                    "server then start no Python interpreter. Needs a C compiler.")
    p.add_argument("bindir", type=Path, help="the directory holding the console scripts")
    args = p.parse_args(argv)
    failed = False
    for command in COMMANDS:
        try:
            path = install(args.bindir, command)
        except LauncherError as e:
            print(f"fusesnap: launcher of {command}: {e}", file=sys.stderr)
            failed = True
        else:
            print(f"fusesnap: launcher installed at {path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
