#!/usr/bin/env python3
"""fusesnap benchmark: the same lowers mounted by every target, measured side by side.

Builds its workloads once (cached under --cache), mounts them with each target
(plain directory, kernel overlayfs, fuse-overlayfs, fusesnap-overlay, fusesnap's
store-backed mount), runs every workload --runs times with the targets
alternating inside each repetition, and prints a markdown table of medians with
ratios to the plain directory and to fuse-overlayfs. Stdlib only.

    scripts/bench.py                      # full run, 7 repetitions
    scripts/bench.py --quick              # 3 repetitions
    scripts/bench.py --only walk-warm,readdir-cold --targets plain,fuse-overlayfs
    scripts/bench.py --build-only         # just build the cached workloads
    scripts/bench.py --list               # workload names
    scripts/bench.py --containerd         # fusesnap serve under containerd (ctr run, pull, mounts)
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib.build import DEFAULT_CACHE, SCALES, build, build_rootfs, describe  # noqa: E402
from benchlib.profile import find_pyspy, summarize  # noqa: E402
from benchlib.report import as_json, table  # noqa: E402
from benchlib.runner import Cell, Options, Runner, log  # noqa: E402
from benchlib.memreport import no_free_page_reporting  # noqa: E402
from benchlib.scratchfs import CHOICES, scratch_fs  # noqa: E402
from benchlib.sysutil import BenchError, is_root, rmtree  # noqa: E402
from benchlib.startup_bench import STARTUP_WORKLOADS, startup_titles  # noqa: E402
from benchlib.targets import ALL_TARGETS, EXTRA_TARGETS, find_program, make_targets  # noqa: E402
from benchlib.workloads import WORKLOADS, titles_for, walk  # noqa: E402
from benchlib.images_bench import IMAGE_WORKLOADS, image_titles, rootfs_layout  # noqa: E402
from benchlib.podman_bench import PODMAN_WORKLOADS  # noqa: E402
from benchlib.recorder_bench import RECORDER_WORKLOADS  # noqa: E402

WORKLOADS = WORKLOADS + STARTUP_WORKLOADS + IMAGE_WORKLOADS + RECORDER_WORKLOADS + PODMAN_WORKLOADS

KNOWN_TARGETS = ALL_TARGETS + EXTRA_TARGETS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=None, help="repetitions per workload and target (default 7)")
    p.add_argument("--quick", action="store_true", help="a short run: 3 repetitions")
    p.add_argument("--only", default="", help="comma-separated workload names (see --list)")
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help=f"comma-separated, from {', '.join(KNOWN_TARGETS)} "
                   "(default: all but the last)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="also write JSON results to FILE (stdout when no FILE)")
    p.add_argument("--markdown", type=Path, default=None, metavar="FILE",
                   help="also write the table with date, machine, versions and command to FILE")
    p.add_argument("--cache", type=Path, default=None, help=f"workload cache (default {DEFAULT_CACHE})")
    p.add_argument("--scale", choices=sorted(SCALES), default="full", help="workload sizes (tiny: for tests)")
    p.add_argument("--mirror", default=None, help="Debian mirror for debootstrap (default: from /etc/apt)")
    p.add_argument("--fusesnap-bin", type=Path, default=None, help="directory holding fusesnap and fusesnap-overlay")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a step counts as hung (default 900)")
    p.add_argument("--no-drop-caches", action="store_true", help="cold steps without dropping caches (tests)")
    p.add_argument("--scratch-fs", choices=CHOICES, default=None,
                   help="where uppers, stores and untar write: a fresh journaled ext4 made for the run "
                        "(default as root), or the host filesystem under --cache, whose state after "
                        "earlier deletes can move create/untar by seconds (benchlib/scratchfs.py)")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="after each workload, one extra unrecorded run of the fusesnap targets under py-spy; "
                        "raw profiles and a summary go to DIR")
    p.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                   help="print the table of a saved --json result (no measuring)")
    p.add_argument("--build-only", action="store_true", help="build the workloads and exit")
    p.add_argument("--list", action="store_true", help="list workloads and exit")
    p.add_argument("--containerd", action="store_true",
                   help="instead of the workloads: fusesnap serve under a real containerd beside its overlayfs "
                        "and native snapshotters (benchlib/containerd_bench.py); its rootfs-image row uses the "
                        "rootfs of --cache, built there first if missing")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 3 if args.quick else 7
    if args.runs < 1:
        p.error("--runs must be at least 1")
    args.cache = args.cache or (DEFAULT_CACHE if args.scale == "full" else DEFAULT_CACHE.with_name(f"fusesnap-bench-{args.scale}"))
    names = {w.name for w in WORKLOADS}
    args.only = [x for x in args.only.split(",") if x]
    bad = [x for x in args.only if x not in names]
    if bad:
        p.error(f"unknown workload {', '.join(bad)} (known: {', '.join(w.name for w in WORKLOADS)})")
    args.targets = [x for x in args.targets.split(",") if x]
    bad = [x for x in args.targets if x not in KNOWN_TARGETS]
    if bad or not args.targets:
        p.error(f"unknown target {', '.join(bad) or '(none)'} (known: {', '.join(KNOWN_TARGETS)})")
    return args


def version_of(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    lines = (p.stdout + p.stderr).splitlines()
    name = Path(cmd[0]).name
    for line in lines:
        if line.startswith(name):
            return line.strip()
    for line in lines:
        if "version" in line.lower():
            return line.strip()
    return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else "n/a"


def machine(args: argparse.Namespace) -> dict[str, object]:
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    fusesnap = find_program("fusesnap", args.fusesnap_bin)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "ram_gib": round(mem / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fuse-overlayfs": version_of(["fuse-overlayfs", "--version"]),
        "fusesnap": version_of([fusesnap, "--version"]) if fusesnap else "n/a",
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }


def markdown_report(meta: dict[str, object], intro: str, md: str) -> str:
    w = meta["workset"]
    assert isinstance(w, dict)
    return (
        f"- date: {meta['date']}\n"
        f"- machine: {meta['nproc']} CPUs, {meta['ram_gib']} GiB RAM, Linux {meta['kernel']}, Python {meta['python']}\n"
        f"- versions: {meta['fuse-overlayfs']}; {meta['fusesnap']}\n"
        f"- command: `{meta['command']}`\n"
        f"- writable workloads on: {meta.get('scratch_fs', 'host filesystem under --cache')}\n"
        f"- free page reporting (virtio-balloon): {meta.get('free_page_reporting', 'not changed')}\n"
        f"- workloads: rootfs {w['rootfs_entries']} entries / {w['rootfs_bytes'] / 1e6:.0f} MB merged from 2 layers "
        f"(layer 2: {w['rootfs_layer2_whiteouts']} whiteouts, {w['rootfs_layer2_opaque_dirs']} opaque dirs); "
        f"{w['chain_layers']}-layer chain of {w['chain_files']} files; {w['dir_entries']}-entry directory; "
        f"{w['tree_files']}-file tree; {w['create_files']} created files\n\n"
        f"{intro}\n{md}"
    )


def rerender(path: Path) -> int:
    """The table (and the markdown header) of a saved --json result."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"bench: error: cannot read {path}: {e}", file=sys.stderr)
        return 1
    byname = {w.name: w for w in WORKLOADS}
    rows = [r for r in data["workloads"] if r["name"] in byname]
    workloads = [byname[r["name"]] for r in rows]
    targets = list(rows[0]["targets"]) if rows else []
    results = {r["name"]: {t: Cell(runs=c["runs"], error=c["error"]) for t, c in r["targets"].items()} for r in rows}
    titles = {r["name"]: r["title"] for r in rows}
    print(table(workloads, titles, results, targets))
    return 0


def containerd(args: argparse.Namespace) -> int:
    """The containerd table; its rootfs-image row uses the workload cache's rootfs (built if missing)."""
    from benchlib.containerd_bench import run as containerd_rows

    try:
        rootfs = build_rootfs(args.cache, SCALES[args.scale], args.mirror)
        layout: Path | None = rootfs_layout(rootfs.tars, args.cache / "image-oci")
    except (BenchError, PermissionError) as e:
        log(f"no rootfs-image row: building the rootfs: {e}")
        layout = None
    return containerd_rows(args.runs, args.scale, layout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for w in WORKLOADS:
            print(f"{w.name:18} {w.title}")
        return 0
    if args.from_json:
        return rerender(args.from_json)
    args.cache.mkdir(parents=True, exist_ok=True)
    lock = open(args.cache / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"bench: error: another bench.py is using {args.cache} (use --cache)", file=sys.stderr)
        return 1
    if args.containerd:
        return containerd(args)
    try:
        ws = build(args.cache, SCALES[args.scale], args.mirror)
    except BenchError as e:
        print(f"bench: error: building workloads: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"bench: error: building workloads needs root: {e}", file=sys.stderr)
        return 1
    if args.build_only:
        log(f"workloads ready in {args.cache}")
        return 0
    drop = is_root() and not args.no_drop_caches
    if not drop:
        log("cold steps run WITHOUT dropping caches (" + ("--no-drop-caches" if is_root() else "not root") + ")")

    workloads = [w for w in WORKLOADS if not args.only or w.name in args.only]
    titles = {**titles_for(ws), **startup_titles(ws), **image_titles(ws)}
    n, size = walk(Path(ws.stacks["rootfs"].flat))
    expect = {"rootfs_entries": n, "rootfs_bytes": size}
    scratch = args.cache / "run"
    rmtree(scratch)
    scratch.mkdir(parents=True)
    os.chmod(scratch, 0o755)
    timeout = args.timeout or (900.0 if args.scale == "full" else 120.0)
    pyspy = find_pyspy() if args.profile else None
    if args.profile and not pyspy:
        log("--profile: py-spy not found (pip install py-spy); not profiling")
    try:
        with no_free_page_reporting() as reporting, scratch_fs(args.scratch_fs, scratch) as scratch_desc:
            log(f"writable workloads write to: {scratch_desc}")
            targets = make_targets(args.targets, args.fusesnap_bin, scratch / "store")
            for t in targets:
                why = t.unavailable()
                if why:
                    log(f"target {t.name}: n/a: {why}")
            runner = Runner(ws, targets, Options(args.runs, drop, timeout, scratch, args.profile, pyspy), expect)
            results = runner.run(workloads)
    except BenchError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    finally:
        rmtree(scratch)
    meta = machine(args)
    meta.update({"runs": args.runs, "scale": args.scale, "caches_dropped": drop, "workset": describe(ws),
                 "scratch_fs": scratch_desc, "free_page_reporting": reporting})
    md = table(workloads, titles, results, args.targets)
    intro = (f"Medians of {args.runs} runs, targets alternating within each repetition "
             f"({'cold = `sync; echo 3 > /proc/sys/vm/drop_caches` before the step' if drop else 'caches NOT dropped'}). "
             "Ratios are cost ratios: above 1.0 means slower (more time, fewer MB/s, more memory) "
             "than the reference; ↑ marks higher-is-better rows. "
             f"Writable workloads on: {scratch_desc}.\n")
    print(f"\nfusesnap benchmark, {meta['date']}. {intro}")
    print(md)
    if args.markdown:
        args.markdown.write_text(markdown_report(meta, intro, md))
    if args.profile and pyspy and args.profile.is_dir():
        summary = []
        for raw in sorted(args.profile.glob("*--*.txt")):
            summary.append(f"### {raw.stem.replace('--', ' on ')}\n\n{summarize(raw)}")
        (args.profile / "SUMMARY.md").write_text("\n".join(summary))
        log(f"profiles in {args.profile}, summary in {args.profile / 'SUMMARY.md'}")
    if args.json:
        data = json.dumps(as_json(workloads, titles, results, args.targets, meta), indent=1)
        if args.json == "-":
            print(data)
        else:
            Path(args.json).write_text(data + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
