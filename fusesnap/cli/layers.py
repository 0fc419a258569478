"""`fusesnap` layer commands: import, export, layers, inspect, rm, gc, fsck."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from ..errors import FusesnapError, InvalidInput, NotFound
from .images import check_not_image_archive
from .labels import parse_labels
from .output import emit_json, output_file
from .progress import Progress, ProgressReader, ProgressWriter, file_size

if TYPE_CHECKING:
    from ..store.layerstore import LayerStore

# The store and snapshot modules (and sqlite3 with them) are imported inside the commands:
# `fusesnap --help` and a mount's argument parsing must not load them
# (tests/fuse/test_mount_startup.py pins it).


def _store(args: argparse.Namespace) -> "LayerStore":
    from ..store.layerstore import LayerStore

    return LayerStore(args.root)


def _resolve(st: "LayerStore", args: argparse.Namespace, ref: str) -> Any:
    """A layer by chainID, hex prefix or name; else by a committed snapshot name of an older store."""
    from ..snapshots.names import chain_of_name

    try:
        return st.get(ref)
    except NotFound:
        chain = chain_of_name(args.root, ref)
        if chain is None:
            raise
        return st.get(chain)


def _import_with_progress(st: Any, f: Any, args: argparse.Namespace, labels: dict[str, str]) -> Any:
    bar = Progress("importing", file_size(f))
    try:
        return st.import_tar(ProgressReader(f, bar), args.parent, labels=labels)
    finally:
        bar.close()


def _export_with_progress(st: Any, info: Any, f: Any) -> None:
    bar = Progress("exporting", info.tar_size)
    try:
        st.export(info.chain_id, ProgressWriter(f, bar))
    finally:
        bar.close()


def cmd_import(args: argparse.Namespace) -> int:
    from ..store.layerstore import GC_ROOT_LABEL, NAME_LABEL

    labels = {GC_ROOT_LABEL: "true", **parse_labels(args.label)}
    if args.name:
        labels[NAME_LABEL] = args.name
    with _store(args) as st:
        if args.file == "-":
            src = sys.stdin.buffer if args.raw else check_not_image_archive(sys.stdin.buffer, "stdin")
            info = _import_with_progress(st, src, args, labels)
        else:
            try:
                f = open(args.file, "rb")
            except IsADirectoryError:
                hint = (f": an OCI image layout, use `fusesnap pull oci:{args.file}`"
                        if os.path.exists(os.path.join(args.file, "oci-layout")) else "")
                raise InvalidInput(f"cannot import {args.file}: it is a directory{hint}") from None
            except OSError as e:
                raise InvalidInput(f"cannot open {args.file}: {e.strerror}") from None
            with f:
                src = f if args.raw else check_not_image_archive(f, args.file)
                info = _import_with_progress(st, src, args, labels)
    if args.json:
        emit_json(info.to_json())
    else:
        print(info.chain_id)
        print(info.diff_id)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with _store(args) as st:
        info = _resolve(st, args, args.ref)
        if args.output:
            with output_file(args.output) as f:
                _export_with_progress(st, info, f)
        else:
            if sys.stdout.isatty():
                raise InvalidInput("refusing to write a tar to a terminal (use -o FILE or a redirect)")
            _export_with_progress(st, info, sys.stdout.buffer)
            sys.stdout.buffer.flush()
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    with _store(args) as st:
        infos = st.list()
    if args.json:
        emit_json([i.to_json() for i in infos])
        return 0
    print(f"{'CHAIN ID':<19} {'DIFF ID':<19} {'PARENT':<19} {'SIZE':>12} {'REFS':>4}  NAME")
    for i in infos:
        short = lambda d: d[7:19] if d else "-"  # noqa: E731
        name = ",".join(i.names)
        print(f"sha256:{short(i.chain_id):<12} sha256:{short(i.diff_id):<12} "
              f"{('sha256:' + short(i.parent)) if i.parent else '-':<19} {i.size:>12} {i.refcount:>4}  {name}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    with _store(args) as st:
        info = _resolve(st, args, args.ref)
        chain = st.chain(info.chain_id)
    obj = info.to_json()
    obj["chain"] = chain
    if args.json:
        emit_json(obj)
    else:
        for k in ("chain_id", "diff_id", "parent", "size", "diff_size", "tar_size", "created", "refcount"):
            print(f"{k}: {obj[k] if obj[k] is not None else '-'}")
        print("compressed_digests: " + (", ".join(info.compressed_digests) or "-"))
        print("names: " + (", ".join(info.names) or "-"))
        print("labels: " + (", ".join(f"{k}={v}" for k, v in sorted(info.labels.items())) or "-"))
        print("chain: " + " ".join(chain))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _store(args) as st:
        for ref in args.refs:
            chain = st.get(ref).chain_id
            st.remove(chain)
            if not args.json:
                print(chain)
    if args.json:
        emit_json({"removed": args.refs})
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    with _store(args) as st:
        removed = st.gc()
    if args.json:
        emit_json({"removed": removed})
    else:
        for c in removed:
            print(c)
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from ..snapshots.snapshotter import fsck_store

    rep = fsck_store(args.root, repair=args.repair)
    if args.json:
        emit_json(rep.to_json())
    else:
        for r in rep.repaired:
            print(f"repaired: {r}")
        for p in rep.problems:
            print(f"problem: {p}")
        print(f"fsck: {rep.checked} layers checked, {len(rep.problems)} problems, {len(rep.repaired)} repaired")
    if not rep.ok:
        raise FusesnapError(f"fsck found {len(rep.problems)} problem(s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands."""
    p = sub.add_parser("import", help="import a layer tar (plain, gzip or zstd) from FILE or '-' (stdin)")
    p.add_argument("file", metavar="FILE|-")
    p.add_argument("--parent", metavar="CHAINID", help="chainID (or name) of the parent layer")
    p.add_argument("--name", help="a name for the layer (a layer may have several; a name names one layer)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="set a label (repeatable)")
    p.add_argument("--raw", action="store_true",
                   help="store FILE as one layer even if it is an image archive (docker-archive, oci-archive)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="write a layer's original tar, byte for byte, to stdout or -o FILE")
    p.add_argument("ref", metavar="CHAINID|NAME")
    p.add_argument("-o", "--output", metavar="FILE")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("layers", help="list layers")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("inspect", help="show one layer")
    p.add_argument("ref", metavar="CHAINID|NAME")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("rm", help="remove layers (refused while a child or a reference needs them)")
    p.add_argument("refs", nargs="+", metavar="CHAINID|NAME")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("gc", help="remove leftovers and layers nothing references")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("fsck", help="verify the database, layers against their index, snapshots against layers",
                       description="Check the store: the database file, every layer's data against its index"
                       " and diffID, rows against directories, leftovers of interrupted operations, and"
                       " snapshot records against the layers they hold.")
    p.add_argument("--repair", action="store_true",
                   help="finish or undo interrupted operations, rebuild lost rows (or a damaged database)"
                   " from the layers' own records, drop references no snapshot holds; never deletes a"
                   " complete layer")
    p.set_defaults(func=cmd_fsck)
