"""`fusesnap-overlay`: a drop-in for fuse-overlayfs (podman mount_program, mount.fuse3).

The FUSE layer and the core are imported inside the functions: the daemon is
forked before them so that its pyfuse3/trio imports overlap the parent's work
(fs/fuse/mount.py), and `--help` or a bad option line never pays for them.
"""

from __future__ import annotations

import os
import sys

from fusesnap import __version__
from fusesnap.errors import FusesnapError
from fusesnap.fs.options import MountOptions, parse_options

USAGE = """usage: fusesnap-overlay [-f] [-d] -o lowerdir=A:B[,upperdir=U,workdir=W,...] MOUNTPOINT
       fusesnap-overlay SOURCE MOUNTPOINT -o OPTIONS     (mount.fuse3 form)"""

HELP = USAGE + """

Mount a union of read-only lower directories (leftmost on top) and a writable
upper directory, with overlayfs/OCI whiteouts, without root or kernel overlayfs.
A drop-in for fuse-overlayfs (podman's mount_program). Returns once the mount is
live; the daemon exits when the filesystem is unmounted (fusermount3 -u).

flags:
  -f            stay in the foreground
  -d, --debug   foreground, log every request
  -o OPTIONS    comma-separated; may be given more than once
  -V, --version print the version

options (fuse-overlayfs' vocabulary):
  lowerdir=A:B:...      lower directories, top first (\\: escapes a colon)
  upperdir=U,workdir=W  writable upper and its work directory (none: read-only)
  ro                    read-only even with an upper
  uidmapping=H:P:N, gidmapping=H:P:N   on-disk to presented id ranges
  squash_to_root, squash_to_uid=N, squash_to_gid=N   present every owner as one
  xattr_permissions=0|1|2   keep owners/modes the host refuses in an xattr
  static_nlink          directories report st_nlink 1
  noxattrs=1            no extended attributes through the mount
  timeout=SECONDS       kernel cache timeout for entries and attributes (3600)
  volatile, fsync=0     fsync does nothing
  writeback=1           the kernel's writeback cache (off: a full disk then
                        fails close() after every write() succeeded)
  busy_poll=US          spin up to US microseconds for the next request before
                        sleeping (default 50 with two CPUs or more, else 0)
  read_ahead_kb=N       the mount's read-ahead (root only; default 1024)
  readdirplus=always|auto   listings carry every entry's attributes (always,
                        the default: a walk that stats what it lists sends no
                        lookups) or only where entries get looked up (auto:
                        cheaper for huge directories only listed by name)
  allow_other           let other users use the mount (off by default)
  suid, dev             honour setuid bits and device nodes (off by default)
  default_permissions, fsname=NAME, and the mount flags
  exec/noexec, atime/noatime, sync/async ...
Unknown options are ignored with a warning.

Mounts are nodev,nosuid and only their owner may use them, for root too:
ask for dev, suid or allow_other. Root of a user namespace other than the
host's (rootless podman's mount program) gets allow_other and suid by
default, as with fuse-overlayfs: there the kernel confines them to that
namespace's processes and ids."""


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
            print(HELP)
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
    from fusesnap.fs.fuse.mount import TreeUnavailable, spawn_daemon

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
    from fusesnap.fs.core.lazytree import LazyLowerTree
    from fusesnap.fs.core.lowertree import lower_tree_from_dirs
    from fusesnap.fs.fuse.mount import mount
    try:
        tree = lower_tree_from_dirs(opts.lowerdirs) if eager else LazyLowerTree(opts.lowerdirs)
    except (FusesnapError, OSError) as e:
        print(f"fusesnap-overlay: {e}", file=sys.stderr)
        return 1
    return mount(tree, opts.upperdir, opts.workdir, mountpoint, opts, foreground)


if __name__ == "__main__":
    sys.exit(main())
