"""`fusesnap serve`: containerd's proxy snapshotter daemon on a unix socket."""

from __future__ import annotations

import argparse
import os
import signal
import sys


def cmd_serve(args: argparse.Namespace) -> int:
    # grpc and the daemon cost every other command ~130 ms of imports: loaded only here
    from ..daemon.server import Daemon, default_address, notify_ready

    # The signal only wakes the main thread through a pipe (signal.set_wakeup_fd): a
    # handler that took a lock (threading.Event.set) could deadlock with the main thread
    # holding that very lock when the signal lands.
    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    address = args.address or default_address()
    daemon = Daemon(args.root, address, workers=args.workers, mount_mode=args.mounts)
    print(f"fusesnap: serving containerd snapshots of {args.root} on {daemon.address}", file=sys.stderr, flush=True)
    notify_ready()
    signum = os.read(r, 1)[0]
    print(f"fusesnap: {signal.Signals(signum).name}: stopping", file=sys.stderr, flush=True)
    daemon.stop(args.grace)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `serve`."""
    p = sub.add_parser(
        "serve", help="serve containerd's snapshots API on a unix socket (proxy snapshotter)",
        description="Run containerd's Snapshots gRPC service (containerd.services.snapshots.v1) over the\n"
        "store given by --root, so that containerd (and nerdctl, CRI, BuildKit on it) can use\n"
        "fusesnap as a [proxy_plugins] snapshotter. By default the daemon mounts each snapshot\n"
        "itself and containerd bind-mounts it (--mounts bind). SIGTERM/SIGINT stop it once\n"
        "running calls finish; snapshots and the mounts of running containers survive a restart.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="containerd config (/etc/containerd/config.toml):\n"
        "  [proxy_plugins.fusesnap]\n"
        "    type = \"snapshot\"\n"
        "    address = \"/run/fusesnap/fusesnap.sock\"\n"
        "then: ctr images pull --snapshotter fusesnap IMAGE; ctr run --snapshotter fusesnap IMAGE ID",
    )
    p.add_argument("--address", metavar="SOCKET", default=None,
                   help="unix socket to listen on (default: /run/fusesnap/fusesnap.sock as root, "
                   "$XDG_RUNTIME_DIR/fusesnap/fusesnap.sock otherwise); created mode 0660")
    p.add_argument("--mounts", choices=("bind", "fuse3"), default="bind",
                   help="bind (default): the daemon mounts each snapshot at Prepare/View and containerd "
                   "bind-mounts it; fuse3: containerd mounts `fuse3.fusesnap` itself through mount.fuse3, "
                   "which needs `fusesnap` on its PATH")
    p.add_argument("--workers", type=int, default=8, metavar="N",
                   help="calls served at once (default: %(default)s)")
    p.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long running calls (a commit) may take to finish "
                   "(default: %(default)s)")
    p.set_defaults(func=cmd_serve)
