#!/usr/bin/env python3
"""fusesnap under stress: seeded kills, hostile inputs, concurrent clients and a verified load.

Every phase works on one store and ends with the same promises checked: after a crash no
layer shares an inode with a snapshot's upper and no reference lacks its snapshot;
`fsck --repair` mends what the crash left and `fsck` is clean afterwards; every byte the
store acknowledged (an import or commit that returned, a file fsync'ed through a mount) is
still there. A failure prints what broke and the seed that replays it.

    scripts/stress.py --short          # what CI runs: a few kills per operation, ~1-2 minutes
    scripts/stress.py                  # long: 50 kills per operation and minutes of load
    scripts/stress.py --seed 42 --json result.json

Run it with the venv's python (it imports fusesnap for the checks) as root or as a user
who may mount FUSE; it uses the console scripts next to that python (or --bin DIR).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stresslib.clients import clients  # noqa: E402
from stresslib.common import Cli, Model, StressFailure, log, repaired_and_clean  # noqa: E402
from stresslib.fuzz import fuzz  # noqa: E402
from stresslib.kills import kill_commits, kill_gcs, kill_imports, kill_removes  # noqa: E402
from stresslib.mounts import fsx, kill_daemons  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="stress.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--short", action="store_true", help="the CI mode: fewer kills, shorter load")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock; printed)")
    p.add_argument("--kills", type=int, default=None, help="kill points per operation (default 50, short 4)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--client-seconds", type=float, default=None, help="default 120, short 15")
    p.add_argument("--fsx-workers", type=int, default=8, help="fsx workers in one mount (default 8)")
    p.add_argument("--fsx-seconds", type=float, default=None, help="default 180, short 15")
    p.add_argument("--hostile", type=int, default=None, help="hostile inputs to import (default 500, short 40)")
    p.add_argument("--only", default="", help="comma-separated phases: kills,daemon,hostile,clients,fsx")
    p.add_argument("--bin", type=Path, default=Path(sys.executable).parent, help="where the fusesnap script is")
    p.add_argument("--workdir", type=Path, default=None, help="keep the store here (default: a temp dir, removed)")
    p.add_argument("--json", type=Path, default=None, help="write the figures as JSON to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    seed = a.seed if a.seed is not None else int(time.time())
    kills = a.kills if a.kills is not None else (4 if a.short else 50)
    client_s = a.client_seconds if a.client_seconds is not None else (15 if a.short else 120)
    fsx_s = a.fsx_seconds if a.fsx_seconds is not None else (15 if a.short else 180)
    hostile = a.hostile if a.hostile is not None else (40 if a.short else 500)
    phases = set(a.only.split(",")) if a.only else {"kills", "daemon", "hostile", "clients", "fsx"}
    work = a.workdir or Path(tempfile.mkdtemp(prefix="fusesnap-stress-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"seed {seed}, store {work / 'root'}")
    rnd = random.Random(seed)
    cli = Cli(a.bin, work / "root")
    model = Model()
    figures: dict = {"seed": seed, "mode": "short" if a.short else "long", "kills": {}}
    t0 = time.monotonic()
    try:
        if "kills" in phases:
            for op, fn in (("import", kill_imports), ("commit", kill_commits), ("remove", kill_removes),
                           ("gc", kill_gcs)):
                t = time.monotonic()
                n, landed = fn(cli, rnd, kills, model, work)
                figures["kills"][op] = {"kills": n, "mid_operation": landed}
                log(f"{op}: {n} kills survived, {landed} of them mid-operation ({time.monotonic() - t:.0f} s)")
        if "daemon" in phases:
            t = time.monotonic()
            n, files = kill_daemons(cli, rnd, kills, model, work)
            figures["kills"]["daemon"] = {"kills": n, "acknowledged_files_checked": files}
            log(f"daemon: {n} kills of a live mount's daemon survived, {files} acknowledged files all present"
                f" ({time.monotonic() - t:.0f} s)")
        if "hostile" in phases:
            acc, ref = fuzz(cli, rnd, hostile)
            figures["hostile"] = {"tried": hostile, "accepted": acc, "refused": ref}
            log(f"hostile inputs: {hostile} tried, {acc} accepted (exported byte for byte), {ref} refused")
        if "clients" in phases:
            ops = clients(cli, rnd, a.clients, client_s, model)
            figures["clients"] = {"clients": a.clients, "seconds": client_s, "operations": ops}
            log(f"concurrent clients: {a.clients} for {client_s:.0f} s, {ops} operations, none failed")
        if "fsx" in phases:
            ops = fsx(cli, rnd, a.fsx_workers, fsx_s, model, work)
            figures["fsx"] = {"workers": a.fsx_workers, "seconds": fsx_s, "operations": ops}
            log(f"fsx: {a.fsx_workers} workers for {fsx_s:.0f} s, {ops} operations checked against the model")
        repaired_and_clean(cli, "the end")
        model.verify(cli.root, "the end")
    except StressFailure as e:
        log(f"FAILED (seed {seed}): {e}")
        log(f"the store is kept at {cli.root}")
        return 1
    figures["seconds"] = round(time.monotonic() - t0, 1)
    figures["acknowledged"] = {"layers": len(model.layers), "commits": len(model.commits),
                               "actives": len(model.actives)}
    log(f"all promises held in {figures['seconds']} s: {json.dumps(figures)}")
    if a.json:
        a.json.write_text(json.dumps(figures, indent=2) + "\n")
    if a.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
