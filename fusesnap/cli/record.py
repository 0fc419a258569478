"""`fusesnap` access-record commands: record inspect, warm, optimize.

A record comes from `fusesnap mount --record FILE` (or `fusesnap-overlay -o
record=FILE`, or the Recorder API). Heavy modules are imported inside the
commands so `fusesnap --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import InvalidInput, NotFound
from .output import emit_json


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _mib(n: int) -> str:
    return f"{n / 1048576:,.1f} MiB"


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..snapshots.accessrecord import load, summarize

    s = summarize(load(args.file))
    if args.json:
        emit_json(s)
        return 0
    print(f"files: {s['files']}")
    print(f"bytes: {s['bytes']} ({_mib(s['bytes'])})")
    rows = [("LAYER", "CHAIN_ID", "FILES", "BYTES")]
    for r in s["layers"]:
        chain = r["chain_id"] or "-"
        rows.append((str(r["layer_index"]), chain if args.no_trunc else chain[:19], str(r["files"]), str(r["bytes"])))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print(f"{row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]:>{widths[3]}}")
    return 0


def top_chain_of(args: argparse.Namespace, target: str) -> str | None:
    """The top chainID behind a snapshot key, an image name or a layer reference."""
    from ..images.records import ImageRecords
    from ..snapshots.snapshotter import Snapshotter

    with Snapshotter(args.root) as sn:
        try:
            return sn.parent_chain(target)
        except NotFound:
            pass
        rec = ImageRecords(sn.store).find(target)
        if rec is not None:
            return rec.top_chain
        try:
            return sn.store.get(target).chain_id
        except NotFound:
            raise NotFound(f"no snapshot, image or layer named {target!r}") from None


def cmd_warm(args: argparse.Namespace) -> int:
    from ..snapshots.accessrecord import load
    from ..snapshots.recorder import ChainView
    from ..snapshots.warmup import warm
    from ..store.layerstore import LayerStore
    from .progress import Progress

    if args.jobs < 1:
        raise InvalidInput("--jobs must be at least 1")
    entries = load(args.record)
    top = top_chain_of(args, args.target)
    with LayerStore(args.root) as st:
        view = ChainView(st, top)
        bar = Progress("warming", sum(e.size for e in entries))
        try:
            res = warm(view, entries, jobs=args.jobs, progress=bar.add)
        finally:
            bar.close()
    if args.json:
        emit_json(res.to_json())
        return 0
    print(f"warmed {_files(res.files)}, {_mib(res.bytes)} in {res.seconds:.2f} s")
    if res.missing:
        print(f"{_files(len(res.missing))} of the record not in {args.target} (made by the workload, or "
              "deleted since)", file=sys.stderr)
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    from ..images.optimize import optimize
    from ..snapshots.accessrecord import load
    from ..store.layerstore import LayerStore
    from .layerprogress import LayerProgress

    entries = load(args.record)
    with LayerStore(args.root) as st:
        res = optimize(st, args.image, entries, args.name, compression=args.compression,
                       events=LayerProgress(quiet=args.quiet))
    if args.json:
        emit_json(res.to_json())
        return 0
    print(res.record.top_chain)
    print(res.record.manifest_digest)
    if not args.quiet:
        moved = sum(r.moved for r in res.layers)
        stuck = sum(len(r.stuck) for r in res.layers)
        print(f"optimized {args.image} into {args.name}: {len(res.layers)} layers rewritten, {_files(moved)} "
              "placed first" + (f", {_files(stuck)} left in place (duplicate names)" if stuck else "")
              + (f"; {_files(len(res.missing))} of the record not in the image" if res.missing else ""),
              file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands."""
    p = sub.add_parser("record", help="inspect access records (`record inspect FILE`)",
                       description="Access records list the files a workload touched, once each, in first-access "
                       "order, with the layer serving each (JSON lines {path, layer_index, chain_id, size}). Make "
                       "one with `fusesnap mount --record FILE KEY MNT` or `fusesnap-overlay -o record=FILE`.")
    rsub = p.add_subparsers(dest="record_command", metavar="inspect")
    q = rsub.add_parser("inspect", help="files and bytes of a record, in total and per layer")
    q.add_argument("file", metavar="FILE")
    q.add_argument("--no-trunc", action="store_true", help="print full chainIDs")
    q.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable JSON output")
    q.set_defaults(func=cmd_inspect)
    p.set_defaults(func=lambda args, parser=p: parser.print_help(sys.stderr) or 2)

    p = sub.add_parser(
        "warm", help="read a record's files into the page cache before the workload starts",
        description="Read the files of an access record, as KEY|IMAGE (a snapshot key, an image name or a "
        "layer) serves them, into the page cache: in recorded order, --jobs at a time. It reads the store's layer files "
        "behind a mount, not the mount, so it works before it is mounted and sends a mount no request; a "
        "workload's first reads through the mount then cost no disk I/O. Recorded files it does not have "
        "(made by the workload) are counted and skipped.")
    p.add_argument("target", metavar="KEY|IMAGE")
    p.add_argument("--record", required=True, metavar="FILE", help="the access record")
    p.add_argument("--jobs", type=int, default=4, metavar="N", help="files read at once (default 4)")
    p.set_defaults(func=cmd_warm)

    p = sub.add_parser(
        "optimize", help="a new image whose layers put a record's files first",
        description="Rewrite IMAGE's layers so that each layer's recorded files come first, in recorded order, "
        "followed by a `.prefetch.landmark` entry (a layer with none starts with `.no.prefetch.landmark`), the "
        "eStargz convention lazy pullers prefetch by. Every member keeps its bytes; the layers' diffIDs change, "
        "the merged tree does not (store mounts hide the landmarks). The result is image NAME in the store, "
        "pushed like any other. Prints its top chainID and manifest digest.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--record", required=True, metavar="FILE", help="the access record")
    p.add_argument("--name", required=True, metavar="NEW", help="name of the optimized image")
    p.add_argument("--compression", choices=("gzip", "zstd", "none"), default="gzip",
                   help="compression of the new layer blobs (default gzip)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display and no summary line")
    p.set_defaults(func=cmd_optimize)
