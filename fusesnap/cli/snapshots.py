"""`fusesnap` snapshot commands: prepare, view, commit, remove, stat, list, update, usage, mounts,
cleanup, diff, mount, umount (containerd's snapshot model over the layer store).

Heavy modules are imported inside the commands so `fusesnap --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInput
from .labels import parse_labels
from .output import emit_json, output_file

if TYPE_CHECKING:   # argparse is imported by build_parser(); a plain mount parses without it
    import argparse


def _open(args: argparse.Namespace):
    from ..snapshots.snapshotter import Snapshotter

    return Snapshotter(args.root)


def _image_parent(sn: Any, parent: str) -> str:
    """An image name stands for its top layer, unless a snapshot or layer has that name."""
    from ..errors import NotFound

    if not parent:
        return parent
    for lookup in (sn.stat, sn.store.get):
        try:
            lookup(parent)
            return parent
        except (NotFound, InvalidInput):
            pass
    from ..images.records import ImageRecords

    rec = ImageRecords(sn.store).find(parent)
    if rec is None:
        return parent
    return rec.top_chain or ""


def cmd_prepare(args: argparse.Namespace) -> int:
    with _open(args) as sn:
        fn = sn.prepare if args.command == "prepare" else sn.view
        mounts = fn(args.key, _image_parent(sn, args.parent or ""), parse_labels(args.label))
        if getattr(args, "json", False):
            emit_json([m.to_json() for m in mounts])
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    with _open(args) as sn:
        info = sn.commit(args.name, args.key, parse_labels(args.label))
    if getattr(args, "json", False):
        emit_json(info.to_json())
    else:
        print(info.chain_id)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    with _open(args) as sn:
        for key in args.keys:
            sn.remove(key)
    return 0


def _print_info(info) -> None:
    print(f"name: {info.name}")
    print(f"kind: {info.kind}")
    print(f"parent: {info.parent}")
    if info.chain_id:
        print(f"chain_id: {info.chain_id}")
    d = info.to_json()
    print(f"created: {d['created']}")
    print(f"updated: {d['updated']}")
    for k, v in sorted(info.labels.items()):
        print(f"label: {k}={v}")


def cmd_stat(args: argparse.Namespace) -> int:
    with _open(args) as sn:
        info = sn.stat(args.key)
    if getattr(args, "json", False):
        emit_json(info.to_json())
    else:
        _print_info(info)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _open(args) as sn:
        infos = sn.list(*args.filters)
    infos.sort(key=lambda i: (i.created, i.name))
    if getattr(args, "json", False):
        emit_json([i.to_json() for i in infos])
        return 0
    def short(s: str) -> str:
        return s if args.no_trunc or not s.startswith("sha256:") else s[:19]

    rows = [("NAME", "KIND", "PARENT", "CHAIN_ID")]
    rows += [(short(i.name), i.kind, short(i.parent), short(i.chain_id or "")) for i in infos]
    w0 = max(len(r[0]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{w0}}  {r[1]:<9}  {r[2]:<{w2}}  {r[3]}".rstrip())
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    from ..snapshots.snapshotter import Info

    with _open(args) as sn:
        cur = sn.stat(args.key)
        paths: list[str] = list(args.fieldpath or [])
        labels: dict[str, str] = {}
        for item in args.label or []:
            k, sep, v = item.partition("=")
            if not k:
                raise InvalidInput(f"bad label {item!r}: expected KEY=VALUE (or KEY to delete it)")
            if sep:
                labels[k] = v
            paths.append(f"labels.{k}")
        if args.parent is not None:
            paths.append("parent")
        if not paths:
            raise InvalidInput("nothing to update: give --label KEY=VALUE (or --label KEY to delete it)")
        info = sn.update(Info(cur.name, cur.kind, args.parent or cur.parent, labels), *paths)
    if getattr(args, "json", False):
        emit_json(info.to_json())
    else:
        _print_info(info)
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    with _open(args) as sn:
        u = sn.usage(args.key)
    if getattr(args, "json", False):
        emit_json({"size": u.size, "inodes": u.inodes})
    else:
        print(f"size: {u.size}")
        print(f"inodes: {u.inodes}")
    return 0


def cmd_mounts(args: argparse.Namespace) -> int:
    with _open(args) as sn:
        emit_json([m.to_json() for m in sn.mounts(args.key)])
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    with _open(args) as sn:
        removed = sn.cleanup()
    if getattr(args, "json", False):
        emit_json(removed)
    else:
        for r in removed:
            print(r)
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    if args.output in (None, "-"):
        if sys.stdout.isatty():
            raise InvalidInput("refusing to write a tar to a terminal: redirect stdout or use -o FILE")
        sys.stdout.flush()
        dst = sys.stdout.buffer
        with _open(args) as sn:
            diff_id = sn.diff(args.key, dst)
        dst.flush()
    else:
        with _open(args) as sn, output_file(args.output) as f:
            diff_id = sn.diff(args.key, f)
    print(diff_id, file=sys.stderr)
    return 0


def _daemon(args: argparse.Namespace) -> Any:
    """The daemon to mount with: forked before the store is opened (it imports
    pyfuse3/trio meanwhile), by main() if it saw a mount command line early enough;
    a no-op context for --foreground, which serves in this process."""
    early = getattr(args, "early_daemon", None)
    if args.foreground:
        if early is not None:
            early.cancel()
        from contextlib import nullcontext

        return nullcontext()
    if early is not None:
        return early
    from ..fs.fuse.mount import spawn_daemon

    return spawn_daemon()


def cmd_mount(args: argparse.Namespace) -> int:
    if getattr(args, "record", None):   # an -o item like any other (a comma in the name escaped)
        args.options.append("record=" + os.path.abspath(args.record).replace(",", "\\,"))
    with _daemon(args) as daemon:
        from ..snapshots.mounting import mount_snapshot

        with _open(args) as sn:
            sn.note_mount(args.key)
            return mount_snapshot(sn, args.key, args.mountpoint, foreground=args.foreground, options=args.options,
                                  daemon=daemon)


def cmd_mount_planned(args: argparse.Namespace) -> int:
    """A mount server's worker given a connection `fusesnap serve` mounted and the plan of
    what it is (snapshots.mounting.mount_plan): no store to open before serving."""
    import json

    with _daemon(args) as daemon:
        from ..snapshots.mounting import mount_planned

        return mount_planned(json.loads(args.plan), args.mountpoint, daemon)


def cmd_mount_helper(args: argparse.Namespace) -> int:
    """`mount -t fuse3.fusesnap fusesnap TARGET -o root=R,snapshot=KEY,...` (via mount.fuse3)."""
    from ..snapshots.mounting import mount_snapshot, split_mount_options

    kv, fuse_opts = split_mount_options(args.options)
    if "snapshot" not in kv:
        raise InvalidInput("missing -o snapshot=KEY (use the options `fusesnap mounts KEY` prints)")
    root = kv.get("root") or args.root
    with _daemon(args) as daemon:
        from ..snapshots.snapshotter import Snapshotter

        with Snapshotter(root) as sn:
            sn.note_mount(kv["snapshot"])
            return mount_snapshot(sn, kv["snapshot"], args.mountpoint, foreground=args.foreground,
                                  options=[",".join(fuse_opts)] if fuse_opts else [], daemon=daemon)


def cmd_umount(args: argparse.Namespace) -> int:
    from ..snapshots.mounting import umount

    umount(args.mountpoint, timeout=args.timeout)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands."""
    import argparse
    for name, helptext in (
        ("prepare", "create an active (writable) snapshot on top of a committed PARENT"),
        ("view", "create a read-only view of a committed PARENT"),
    ):
        p = sub.add_parser(name, help=helptext, description=helptext + ". KEY must be unused.")
        p.add_argument("key", metavar="KEY")
        p.add_argument("parent", metavar="PARENT", nargs="?", default="",
                       help="committed snapshot name, layer chainID or image name (default: empty base)")
        p.add_argument("--label", action="append", metavar="KEY=VALUE", help="set a label (repeatable)")
        p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("commit", help="turn active KEY into committed layer NAME (prints its chainID)",
                       description="Store the changes of active snapshot KEY as an OCI layer, record it as "
                       "NAME and remove KEY. Prints the new chainID on the first line.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="set a label (repeatable)")
    p.set_defaults(func=cmd_commit)

    p = sub.add_parser("remove", help="remove snapshots (refused while children exist)")
    p.add_argument("keys", metavar="KEY", nargs="+")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("stat", help="show a snapshot's info (containerd Info fields)")
    p.add_argument("key", metavar="KEY")
    p.set_defaults(func=cmd_stat)

    p = sub.add_parser("list", help="list snapshots, optionally filtered",
                       description="List snapshots. Filters use containerd's syntax: kind==active, "
                       "parent==X, parent!=\"\", labels.KEY, labels.KEY==V; commas AND selectors, "
                       "several filters OR.")
    p.add_argument("filters", metavar="FILTER", nargs="*")
    p.add_argument("--no-trunc", action="store_true", help="print full chainIDs in the table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("update", help="change a snapshot's labels",
                       description="Change labels. --label K=V sets, --label K deletes. Only labels are "
                       "mutable; --parent (or --fieldpath parent) is refused.")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--label", action="append", metavar="KEY[=VALUE]")
    p.add_argument("--fieldpath", action="append", metavar="PATH", help="containerd field path to update")
    p.add_argument("--parent", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_update)

    p = sub.add_parser("usage", help="disk bytes and inodes a snapshot holds")
    p.add_argument("key", metavar="KEY")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("mounts", help="print, as JSON, the mounts a client performs for KEY")
    p.add_argument("key", metavar="KEY")
    p.set_defaults(func=cmd_mounts)

    p = sub.add_parser("cleanup", help="delete unreferenced snapshot directories and caches")
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("diff", help="write the changeset tar of active KEY (same bytes commit stores)")
    p.add_argument("key", metavar="KEY")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("mount", help="mount an active snapshot (rw) or a view (ro) through FUSE",
                       description="Mount snapshot KEY at MOUNTPOINT. Returns once the mount is live; the "
                       "daemon exits when it is unmounted (fusesnap umount or fusermount3 -u).")
    p.add_argument("key", metavar="KEY")
    p.add_argument("mountpoint", metavar="MOUNTPOINT",
                   help="a directory, or /dev/fd/N: serve the FUSE connection open as descriptor N that "
                   "another process mounted already (as libfuse takes it; root's `fusesnap serve` does this)")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground until unmounted")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT",
                   help="FUSE mount option (repeatable, comma-separated)")
    p.add_argument("--record", metavar="FILE", help="log each file the workload reads or writes once, in "
                   "first-access order, with the layer serving it (JSON lines; see `fusesnap record inspect`)")
    p.set_defaults(func=cmd_mount, quick_exit=True)

    # mount.fuse3 runs `fusesnap SOURCE TARGET -o OPTS` for `mount -t fuse3.fusesnap SOURCE TARGET`;
    # `fusesnap mounts` gives SOURCE "fusesnap", so that is a (hidden) command of its own.
    p = sub.add_parser("fusesnap")
    p.add_argument("mountpoint", metavar="TARGET")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS")
    p.add_argument("-f", dest="foreground", action="store_true")
    p.set_defaults(func=cmd_mount_helper, quick_exit=True)

    p = sub.add_parser("umount", help="unmount a fusesnap mount and wait until it is gone")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    p.set_defaults(func=cmd_umount)
