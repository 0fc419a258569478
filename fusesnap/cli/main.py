"""Entry point of `fusesnap`: global options, logging, error reporting, dispatch.

Each command module exposes `register(subparsers)`, adding subparsers whose
`func(args) -> int | None` does the work. Errors derived from FusesnapError
become a one-line message on stderr and a non-zero exit code.

Module-level imports stay minimal: a mount command line forks its daemon
before argparse and the command modules are even imported (mount
time matters); everything else is imported after that.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import FusesnapError
from .mountargs import helper_source, plain_mount_args

if TYPE_CHECKING:
    import argparse

# Modules that contribute subcommands, in --help order.
COMMAND_MODULES = (
    "fusesnap.cli.layers",
    "fusesnap.cli.snapshots",
    "fusesnap.cli.serve",
    "fusesnap.cli.images",
    "fusesnap.cli.record",
)


def build_parser() -> argparse.ArgumentParser:
    import argparse
    import importlib
    from pathlib import Path

    parser = argparse.ArgumentParser(
        prog="fusesnap",
        description=(
            "Rootless container layer store and FUSE union filesystem. "
            "Imports layer tars (plain, gzip, zstd) into a content-addressed store "
            "keyed by chainID, exports them byte for byte, and mounts chains of "
            "layers with a writable upper without root or kernel overlayfs."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fusesnap {__version__}")
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="store root (default: $FUSESNAP_ROOT or $XDG_DATA_HOME/fusesnap)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for p in sub.choices.values():
        # `fusesnap CMD --json` works as well as `fusesnap --json CMD`; SUPPRESS keeps the
        # subcommand's default from resetting a global --json.
        if "--json" not in p._option_string_actions:
            p.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                           help="machine-readable JSON output")
    return parser




def setup_logging(verbosity: int) -> None:
    import logging

    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="fusesnap: %(levelname)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    console = argv is None       # the console script: this process is ours to end
    argv = helper_source(sys.argv[1:] if argv is None else argv)
    fast = plain_mount_args(argv)
    early = _early_daemon() if fast is not None else None
    try:
        if early is not None:
            # argparse would give the same result (tests/test_mount_startup.py checks);
            # skipping it keeps this process's CPU off the daemon's core
            args = _namespace(fast)
        else:
            parser = build_parser()
            args = parser.parse_args(argv)
        setup_logging(args.verbose)
        if args.root is None:
            from ..paths import default_root

            args.root = default_root()
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        args.early_daemon = early
        rc = run(args)
    finally:
        if early is not None:
            early.cancel()        # not used (an error came first): it exits by itself
            import gc

            gc.enable()
    if console and getattr(args, "quick_exit", False):
        quick_exit(rc)
    return rc


def _namespace(plain: dict[str, Any]) -> Any:
    """What build_parser().parse_args() returns for a plain mount command line."""
    from pathlib import Path
    from types import SimpleNamespace

    from . import snapshots

    ns = SimpleNamespace(root=Path(plain["root"]) if plain["root"] is not None else None,
                         verbose=plain["verbose"], json=plain["json"], command=plain["command"],
                         foreground=False, options=plain["options"], quick_exit=True)
    if plain["command"] == "mount":
        ns.key, ns.mountpoint = plain["positional"]
        ns.record = None              # --record FILE is not a plain command line
        ns.func = snapshots.cmd_mount
    else:
        ns.mountpoint, = plain["positional"]
        ns.func = snapshots.cmd_mount_helper
    return ns


def _early_daemon() -> Any:
    """Fork the mount's daemon now, before the store is opened, so that it imports
    pyfuse3/trio meanwhile (None if the fork fails: the command tries again and
    reports it)."""
    import gc

    # No cyclic GC for the rest of this short-lived command (main() turns it back on):
    # the imports and the store's setup allocate a lot and free nothing, and every
    # millisecond of CPU here competes with the daemon's imports on a busy machine.
    gc.disable()
    try:
        from ..fs.fuse.mount import spawn_daemon

        return spawn_daemon()
    except OSError:
        gc.enable()
        return None


def run(args: argparse.Namespace) -> int:
    """Run the chosen command; errors become one line on stderr and an exit code."""
    try:
        rc = args.func(args)
    except FusesnapError as e:
        print(f"fusesnap: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("fusesnap: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except OSError as e:  # no space, permission denied...: one line too, for every command
        where = f": {e.filename}" if e.filename else ""
        print(f"fusesnap: error: {e.strerror or e}{where}", file=sys.stderr)
        return FusesnapError.exit_code
    except Exception as e:
        sqlite3 = sys.modules.get("sqlite3")  # loaded only if a command used the database
        if sqlite3 is None or not isinstance(e, sqlite3.Error):
            raise
        print(f"fusesnap: error: store database: {e}", file=sys.stderr)
        return FusesnapError.exit_code
    return int(rc or 0)


def quick_exit(rc: int) -> None:
    """Exit without the interpreter's teardown (freeing every module: milliseconds).

    For commands that own their process and have nothing left to clean up (a
    mount whose daemon is live): output is flushed, log handlers closed, then
    os._exit. Callers of main(argv) in-process never get here."""
    import logging
    import os

    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
