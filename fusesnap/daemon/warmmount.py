"""A mount process started before it is needed (`python -m fusesnap.daemon.warmmount ROOT`).

Starting a mount costs a fresh interpreter, its imports and the FUSE daemon's
pyfuse3/trio imports: well over 100 ms, most of a `ctr run`. In bind mode the
daemon keeps one or two of these processes ready: each has already forked its
FUSE daemon (which imports while it waits) and opened the store, and blocks
reading one JSON line `[KEY, MOUNTPOINT]` on stdin. It then mounts that
snapshot exactly as `fusesnap mount KEY MOUNTPOINT` would, writes its exit
status as a line on stdout as soon as it has one (the daemon need not wait for
this process to end) and exits with it; the reason for a failure is its last
stderr line. An empty stdin (the
daemon stopping) lets it and its FUSE daemon exit without mounting anything.

Kept import-light before the fork: the FUSE daemon is forked first, from a
process that has imported nothing heavy and runs no threads.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    from ..fs.fuse.mount import spawn_daemon

    if len(argv) != 1:
        print("usage: python -m fusesnap.daemon.warmmount ROOT", file=sys.stderr)
        return 2
    with spawn_daemon() as daemon:
        from ..errors import FusesnapError
        from ..snapshots.mounting import mount_snapshot
        from ..snapshots.snapshotter import Snapshotter
        from .unpack import options_for

        with Snapshotter(argv[0]) as sn:
            _ = sn.trees                 # what mounting imports (fs.core, the tree cache) loads
            import fusesnap.fs.options   # noqa: F401  now, while no request waits for it
            line = sys.stdin.readline()
            if not line:
                return 0
            try:
                key, mountpoint = json.loads(line)
                return mount_snapshot(sn, key, mountpoint, daemon=daemon, options=options_for(key))
            except FusesnapError as e:
                print(f"fusesnap: error: {e}", file=sys.stderr)
                return 1
            except (ValueError, TypeError):
                print(f"fusesnap: error: bad request {line.strip()[:200]!r}", file=sys.stderr)
                return 2


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stderr.flush()
    sys.stdout.write(f"{code}\n")
    sys.stdout.flush()
    # the mount is live in its own process: skip the interpreter's teardown (~15 ms of a Prepare)
    os._exit(code)
