"""`fusesnap` image commands: pull, push, images [inspect], rmi.

Heavy modules (httpx, the images package) are imported inside the commands so
that `fusesnap --help` and the layer commands do not pay for them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import InvalidInput
from .output import emit_json


def _remote(args: argparse.Namespace) -> Any:
    from ..images.registry import RemoteOptions

    return RemoteOptions(plain_http=args.plain_http, tls_verify=args.tls_verify, creds=args.creds,
                         authfile=args.authfile, retries=args.retries)


def _human(n: int) -> str:
    return f"{n / 1048576:,.1f} MiB"


def _report(args: argparse.Namespace, as_json: dict[str, Any], lines: list[str], summary: str) -> int:
    """--json: the object; else the lines on stdout and, unless --quiet, the summary on stderr."""
    if args.json:
        emit_json(as_json)
        return 0
    for line in lines:
        print(line)
    if not args.quiet:
        print(summary, file=sys.stderr)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from ..images.manifest import Platform
    from ..images.pull import pull
    from ..images.reference import parse_ref
    from ..snapshots.accessrecord import load as load_record
    from ..store.layerstore import LayerStore
    from .layerprogress import LayerProgress

    ref = parse_ref(args.source)
    platform = Platform.parse(args.platform) if args.platform else None
    record = load_record(args.record) if args.record else ()
    with LayerStore(args.root) as st:
        res = pull(st, ref, name=args.name, platform=platform, opts=_remote(args), jobs=args.jobs,
                   events=LayerProgress(quiet=args.quiet), record=record)
    rec = res.record
    return _report(args, {**rec.summary(), "present": res.present, "transferred": res.transferred},
                   [rec.top_chain or "-", rec.manifest_digest],
                   f"pulled {rec.name}: {res.layers} layers, {res.present} already stored, "
                   f"{_human(res.transferred)} transferred")


def cmd_push(args: argparse.Namespace) -> int:
    from ..images.push import push
    from ..images.reference import parse_ref
    from ..store.layerstore import LayerStore
    from .layerprogress import LayerProgress

    dest = parse_ref(args.dest)
    with LayerStore(args.root) as st:
        res = push(st, args.source, dest, compression=args.compression, opts=_remote(args), jobs=args.jobs,
                   events=LayerProgress(quiet=args.quiet))
    return _report(args, {"manifest_digest": res.manifest_digest, "layers": res.layers, "uploaded": res.uploaded,
                          "skipped": res.skipped, "bytes": res.bytes, "destination": str(dest)},
                   [res.manifest_digest],
                   f"pushed {args.source} to {dest}: {res.uploaded} blobs written, {res.skipped} already there, "
                   f"{_human(res.bytes)} sent")


def cmd_images(args: argparse.Namespace) -> int:
    from ..images.records import ImageRecords
    from ..store.layerstore import LayerStore

    with LayerStore(args.root) as st:
        recs = ImageRecords(st).list()
    if args.json:
        emit_json([r.summary() for r in recs])
        return 0
    rows = [("NAME", "MANIFEST", "LAYERS", "SIZE", "PLATFORM", "CREATED")]
    for r in recs:
        s = r.summary()
        rows.append((r.name, r.manifest_digest[:19], str(s["layers"]), _human(s["size"]), s["platform"],
                     r.created[:19].replace("T", " ")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) if i != 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    return 0


def cmd_images_inspect(args: argparse.Namespace) -> int:
    from ..images.records import ImageRecords
    from ..store.layerstore import LayerStore

    with LayerStore(args.root) as st:
        d = ImageRecords(st).get(args.name).details()
    if args.json:
        emit_json(d)
        return 0
    for k in ("name", "source", "manifest_digest", "media_type", "config_digest", "platform", "created_at",
              "top_chain"):
        print(f"{k}: {d[k] if d[k] is not None else '-'}")
    for k in ("entrypoint", "cmd"):
        print(f"{k}: {' '.join(d[k]) if isinstance(d[k], list) else d[k] or '-'}")
    print(f"working_dir: {d['working_dir'] or '-'}")
    print(f"user: {d['user'] or '-'}")
    for e in d["env"]:
        print(f"env: {e}")
    for k, v in sorted(d["labels"].items()):
        print(f"label: {k}={v}")
    for p in d["exposed_ports"]:
        print(f"exposed_port: {p}")
    for i, layer in enumerate(d["layer_details"]):
        print(f"layer {i}: {layer['digest']} {layer['size']} bytes, diff_id {layer['diff_id']}, "
              f"chain_id {layer['chain_id']}")
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    from ..images.blobs import BlobDir
    from ..images.pull import images_dir
    from ..images.records import ImageRecords
    from ..store.layerstore import LayerStore

    removed = []
    with LayerStore(args.root) as st:
        records = ImageRecords(st)
        for name in args.names:
            removed.append(records.remove(name).name)
        BlobDir(images_dir(st)).remove_unlisted(records.kept_blobs())
    if args.json:
        emit_json({"removed": removed})
    else:
        for n in removed:
            print(n)
    return 0


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _transfer_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registry access")
    g.add_argument("--creds", metavar="USER:PASS", help="credentials (default: from the auth files)")
    g.add_argument("--authfile", metavar="FILE",
                   help="auth file (default: $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, "
                   "~/.config/containers/auth.json, ~/.docker/config.json)")
    g.add_argument("--plain-http", action="store_true", help="talk HTTP, not HTTPS, to the registry")
    g.add_argument("--tls-verify", type=_bool, default=True, metavar="BOOL",
                   help="verify the registry's TLS certificate (default true; --tls-verify=false to skip)")
    g.add_argument("--retries", type=int, default=3, metavar="N", help="retries of a failed request (default 3)")
    p.add_argument("--jobs", type=int, default=3, metavar="N", help="blobs transferred at once (default 3)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display and no summary line")


SOURCES = ("oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG] or "
           "docker://HOST[:PORT]/REPO[:TAG|@DIGEST]")


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands."""
    p = sub.add_parser(
        "pull", help="pull an image into the store (prints its top chainID and manifest digest)",
        description=f"Pull an image from {SOURCES} into the layer store and record it as NAME. Layers the "
        "store already has are not transferred; an interrupted pull resumes where it stopped. Prints the "
        "top layer's chainID (what `prepare KEY NAME` mounts) and the manifest digest.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--name", help="record name (default: the reference, e.g. HOST/REPO:TAG)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="from a multi-platform index "
                   "(default: this machine's)")
    p.add_argument("--record", metavar="FILE", help="an access record (fusesnap mount --record): download "
                   "the layers it reads from first, in the order it first read them")
    _transfer_options(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser(
        "push", help="push an image, a layer chain or a committed snapshot (prints the manifest digest)",
        description="Push SOURCE (an image name, a chainID or layer name, or a committed snapshot) to DEST, "
        f"one of {SOURCES}. Layers are gzip-compressed unless --compression says otherwise (docker-archive: "
        "uncompressed); a pulled image's original blobs are reused, so it keeps its digests. Blobs the "
        "destination has are not sent again.")
    p.add_argument("source", metavar="NAME|CHAINID")
    p.add_argument("dest", metavar="DEST")
    p.add_argument("--compression", choices=("gzip", "zstd", "none"), default=None,
                   help="layer compression (default gzip; pulled layers keep theirs)")
    _transfer_options(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("images", help="list image records; `images inspect NAME` shows one",
                       description="List the images pulled into the store (NAME -> manifest, config, top chainID).")
    p.set_defaults(func=cmd_images)
    isub = p.add_subparsers(dest="images_command", metavar="inspect")
    q = isub.add_parser("inspect", help="show an image: config (entrypoint, env, workdir...) and layers")
    q.add_argument("name", metavar="NAME")
    q.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable JSON output")
    q.set_defaults(func=cmd_images_inspect)

    p = sub.add_parser("rmi", help="remove image records (their layers go at the next gc unless used)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=cmd_rmi)


def check_not_image_archive(f: Any, name: str) -> Any:
    """For `import` without --raw: refuse an image archive with a hint; return the stream to import."""
    from ..images.detect import peek_archive

    stream, kind = peek_archive(f)
    if kind:
        raise InvalidInput(f"{name} is an image archive ({kind}), not a layer: use `fusesnap pull {kind}:{name}` "
                           "(or import --raw to store it as one layer anyway)")
    return stream
