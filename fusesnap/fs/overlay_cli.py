"""`fusesnap-overlay`: a drop-in for fuse-overlayfs (podman mount_program, mount.fuse3)."""

from __future__ import annotations

import os
import sys

from fusesnap import __version__
from fusesnap.errors import FusesnapError
from fusesnap.fs.options import MountOptions, parse_options

USAGE = """usage: fusesnap-overlay [-f] [-d] -o lowerdir=A:B[,upperdir=U,workdir=W,...] MOUNTPOINT
       fusesnap-overlay SOURCE MOUNTPOINT -o OPTIONS     (mount.fuse3 form)"""


def _version() -> str:
    return f"fusesnap-overlay: version {__version__}"


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    foreground = False
    debug = False
    opt_strings: list[str] = []
    positional: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            print(USAGE)
            return 0
        if a in ("-V", "--version"):
            print(_version())
            return 0
        if a == "-f":
            foreground = True
        elif a in ("-d", "--debug"):
            debug = True
            foreground = True
        elif a == "-o":
            if i + 1 >= len(args):
                print("fusesnap-overlay: -o needs an argument", file=sys.stderr)
                return 2
            opt_strings.append(args[i + 1])
            i += 1
        elif a.startswith("-o") and len(a) > 2:
            opt_strings.append(a[2:])
        elif a in ("-s", "-n", "-v"):     # mount.fuse3 / libfuse flags we do not need
            pass
        elif a.startswith("-") and a != "-":
            print(f"fusesnap-overlay: warning: ignoring unknown flag {a!r}", file=sys.stderr)
        else:
            positional.append(a)
        i += 1
    if not positional:
        print(f"fusesnap-overlay: no mountpoint given\n{USAGE}", file=sys.stderr)
        return 2
    mountpoint = positional[-1]
    try:
        opts = parse_options(opt_strings, MountOptions())
        opts.debug = opts.debug or debug
        if not opts.lowerdirs:
            raise FusesnapError("no lowerdir specified (-o lowerdir=DIR[:DIR...])")
        for d in opts.lowerdirs:
            if not os.path.isdir(d):
                raise FusesnapError(f"lowerdir {d!r} does not exist or is not a directory")
        if opts.upperdir is not None and not os.path.isdir(opts.upperdir):
            raise FusesnapError(f"upperdir {opts.upperdir!r} does not exist or is not a directory")
        if opts.workdir is not None and not os.path.isdir(opts.workdir):
            raise FusesnapError(f"workdir {opts.workdir!r} does not exist or is not a directory")
        if not os.path.isdir(mountpoint):
            raise FusesnapError(f"mountpoint {mountpoint!r} does not exist or is not a directory")
    except (FusesnapError, OSError) as e:
        print(f"fusesnap-overlay: {e}", file=sys.stderr)
        return 1
    eager = os.environ.get("FUSESNAP_EAGER_TREE") == "1"
    if opts.debug or foreground:
        return _mount_here(opts, mountpoint, foreground, eager)
    # Daemonizing: fork the daemon before importing pyfuse3/trio, so that this process
    # never loads them and the daemon builds its own (lazy) lower tree.
    from fusesnap.fs.mount import TreeUnavailable, spawn_daemon

    try:
        with spawn_daemon() as daemon:
            rc = daemon.start(("dirs", opts.lowerdirs, eager), opts.upperdir, opts.workdir, mountpoint, opts)
    except (TreeUnavailable, OSError) as e:     # OSError: no fork, no pipe
        print(f"fusesnap-overlay: {e}", file=sys.stderr)
        rc = 1
    if argv is None:      # the console script: this process has nothing left to tear down
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _mount_here(opts: MountOptions, mountpoint: str, foreground: bool, eager: bool) -> int:
    """Build the lower tree in this process, then mount (serving here if foreground)."""
    from fusesnap.fs.lazytree import LazyLowerTree
    from fusesnap.fs.lowertree import lower_tree_from_dirs
    from fusesnap.fs.mount import mount
    try:
        tree = lower_tree_from_dirs(opts.lowerdirs) if eager else LazyLowerTree(opts.lowerdirs)
    except (FusesnapError, OSError) as e:
        print(f"fusesnap-overlay: {e}", file=sys.stderr)
        return 1
    return mount(tree, opts.upperdir, opts.workdir, mountpoint, opts, foreground)


if __name__ == "__main__":
    sys.exit(main())
