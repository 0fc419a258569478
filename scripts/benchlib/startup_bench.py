"""Start-up rows: how soon a mount answers, how a fresh mount's first touches go, what mounts cost in memory.

- "mount returned" (mount-1, mount-100): from the mount command's start until it
  exits with the mount live; "first stat answered" (firststat-1, firststat-100):
  until a stat of a top-level entry of the new mount was answered, so that a
  daemon that returns early and answers late shows (the kernel queues requests
  until the daemon answers FUSE_INIT).
- Fresh-mount variants of the cold rows: every run mounts anew, syncs and drops
  caches, then walks, reads or extracts; the plain cold rows reuse one mount whose
  daemon has long built its tree. A container's first seconds run on this path.
- pss-20: proportional memory (smaps_rollup) per mount with 20 mounts alive,
  each walked: the daemons' PSS plus, for fusesnap, that of the mount server
  they were forked from, divided by 20 (memory the server shares with its
  daemons is counted once, split between them).
"""

from __future__ import annotations

import os
import tarfile

from .build import Workset
from .sysutil import BenchError, pss_mb, with_mount_servers
from .workloads import Ctx, Workload, check, needs_daemon, needs_mount, s_read_all, s_walk, walk

MOUNTS = 20                     # mounts alive at once for the memory row
PROBE = {"base": "etc", "chain": "common"}    # what "first stat answered" stats, per stack


def s_walk_many(c: Ctx) -> float:
    n, _ = walk(c.root)
    s = c.ws.scale
    want = 1 + s.many_dirs * (1 + s.many_per_dir)
    check(n == want, f"walk saw {n} entries of {want}")
    return 0.0


def s_pyuntar(c: Ctx) -> float:
    """Python's tarfile extracting the rootfs tar, as a Python build step in a container would."""
    d = c.root / "pyuntar"
    os.mkdir(d)
    with tarfile.open(c.ws.rootfs_tar) as tf:
        tf.extractall(d, numeric_owner=True)
    return 0.0


def pss_per_mount(pids: list[int | None]) -> float:
    """MB of proportional memory per mount: the daemons' PSS, plus that of the mount
    servers they were forked from and of their spare workers, over the number of mounts."""
    if not pids or any(p is None for p in pids):
        raise BenchError("daemon process not found")
    live = [p for p in pids if p is not None]
    return sum(pss_mb(p) for p in with_mount_servers(live)) / len(live)


STARTUP_WORKLOADS: list[Workload] = [
    Workload("walk-cold-fresh", "rootfs walk (scandir+lstat), cold, fresh mount", "rootfs", "s", "rw", True,
             s_walk, writable=False),
    Workload("manywalk-cold-fresh", "walk of 100k files in 1,000 dirs, cold, fresh mount", "manyfiles", "s", "rw",
             True, s_walk_many, writable=False),
    Workload("read-cold-fresh", "rootfs read all files, cold, fresh mount", "rootfs", "s", "rw", True, s_read_all,
             writable=False),
    Workload("pyuntar-fresh", "Python tarfile extraction of the rootfs into an empty fresh mount", "empty", "s",
             "rw", False, s_pyuntar),
    Workload("mount-1", "mount returned (exec to exit), 1 layer", "base", "s", "mount", False,
             applies=needs_mount),
    Workload("firststat-1", "first stat answered (exec to a stat of /etc), 1 layer", "base", "s", "mount", False,
             applies=needs_mount, probe=PROBE["base"]),
    Workload("mount-100", "mount returned (exec to exit), 100 layers", "chain", "s", "mount", False,
             applies=needs_mount),
    Workload("firststat-100", "first stat answered (exec to a stat of /common), 100 layers", "chain", "s",
             "mount", False, applies=needs_mount, probe=PROBE["chain"]),
    Workload("pss-20", "PSS per mount, 20 rootfs mounts alive, each walked", "rootfs", "MB", "memory", False,
             applies=needs_daemon),
]

def startup_titles(ws: Workset) -> dict[str, str]:
    """These rows' titles with the real sizes of this scale."""
    s = ws.scale
    out = {}
    many = f"{s.many_dirs * s.many_per_dir // 1000}k" if s.many_dirs * s.many_per_dir >= 1000 else \
        str(s.many_dirs * s.many_per_dir)
    for w in STARTUP_WORKLOADS:
        out[w.name] = (w.title.replace("100k files", f"{many} files").replace("1,000 dirs", f"{s.many_dirs:,} dirs")
                       .replace("100 layers", f"{s.chain_layers} layers"))
    return out
