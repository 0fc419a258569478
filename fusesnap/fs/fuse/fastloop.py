"""A cheaper wait for the next FUSE request than pyfuse3's own.

pyfuse3's session loop awaits a waiter before every request: a trio.Lock plus
`trio.lowlevel.wait_readable` (epoll registration, a task park and a
scheduler round trip) -- most of what a request costs in Python. Our pyfuse3
build lets a file system replace it (patch 0010, `set_request_waiter`), so
ours poll(2)s the /dev/fuse fd with a 1 ms timeout first (the
next request of a busy client is usually there, or arrives within
microseconds), yield to trio every 64 requests so threads' results and signals
are still served, and fall back to pyfuse3's original wait when idle.

Busy polling: a client such as tar sends its next request 10-30 us after our
reply, and a daemon asleep in poll(2) then pays a wakeup -- on a VM an idle
vCPU woken by an IPI, 20-40 us, on every request. So after a reply the loop
first polls without sleeping for up to `busy_poll_us`. A spin that finds
nothing doubles the number of later waits that skip spinning (up to 64), and a
hit resets it: a client that pauses between requests costs at most one spin in
64 waits, an idle mount none. Only worth it where the daemon and its client
can run on different CPUs (the caller decides; see `default_busy_poll_us`).

install() returns False, and the stock wait stays, on a pyfuse3 without the
hook (the FUSE layer refuses such a build anyway: operations.require_patched).
"""

from __future__ import annotations

import os
import select
import time

import pyfuse3
import trio

# Long enough for a busy client's next request (docs/BENCHMARKS.md, "Busy polling"),
# short enough that a miss costs little.
BUSY_POLL_US = 50
_MAX_SKIP = 64


def fuse_fds() -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                out.add(int(name))
        except OSError:
            pass
    return out


def _cgroup_cpu_limit(cgroup_file: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs' worth of time the cgroup quota (v2 cpu.max, v1 cfs_quota_us) of this
    process and its ancestors allows, or None without a quota."""
    try:
        lines = open(cgroup_file).read().splitlines()
    except OSError:
        return None
    limit: float | None = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base, v2 = root, True                   # cgroup v2 (unified at /sys/fs/cgroup)
        elif "cpu" in controllers.split(","):
            base, v2 = f"{root}/{controllers}", False
            if not os.path.isdir(base):
                base = f"{root}/cpu"
        else:
            continue
        d = base + path.rstrip("/")
        while True:
            try:
                if v2:
                    quota, period = open(f"{d}/cpu.max").read().split()
                else:
                    quota = open(f"{d}/cpu.cfs_quota_us").read().strip()
                    period = open(f"{d}/cpu.cfs_period_us").read().strip()
                if quota not in ("max", "-1") and int(period) > 0:
                    cpus = int(quota) / int(period)
                    limit = cpus if limit is None else min(limit, cpus)
            except (OSError, ValueError):
                pass
            if len(d) <= len(base):
                break
            d = os.path.dirname(d)
    return limit


def default_busy_poll_us() -> int:
    """BUSY_POLL_US where this process may use two CPUs or more (its affinity, and
    a container's CPU quota), else 0: on one CPU a spinning daemon only delays
    the client it waits for."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, limit)
    return BUSY_POLL_US if cpus >= 2 else 0


class SpinBudget:
    """How long the next wait may busy-poll: `ns` after a hit, then nothing for
    1, 2, 4 ... 64 waits after each consecutive miss."""

    __slots__ = ("ns", "skip", "backoff")

    def __init__(self, us: int) -> None:
        self.ns = max(0, us) * 1000
        self.skip = 0           # waits left that do not spin
        self.backoff = 0        # what the next miss sets skip to

    def take(self) -> int:
        if self.skip:
            self.skip -= 1
            return 0
        return self.ns

    def hit(self) -> None:
        self.backoff = 0

    def miss(self) -> None:
        self.backoff = min(self.backoff * 2, _MAX_SKIP) if self.backoff else 1
        self.skip = self.backoff


def install(fd: int, spin_ms: int = 1, busy_poll_us: int = 0) -> bool:
    set_waiter = getattr(pyfuse3, "set_request_waiter", None)
    if set_waiter is None:
        return False
    orig = set_waiter(None)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poll = poller.poll
    checkpoint = trio.lowlevel.checkpoint
    now = time.monotonic_ns
    budget = SpinBudget(busy_poll_us)
    count = 0

    async def wait_fuse_readable() -> bool:
        # Invariant: return True only right after poll() saw a request, with no
        # await in between -- another worker task may have taken the request a
        # stale wakeup was about, and a blocking read would then stall the loop.
        nonlocal count
        count += 1
        if count & 63 == 0:
            await checkpoint()
        if poll(0):
            return True
        ns = budget.take()
        if ns:
            end = now() + ns
            while now() < end:
                if poll(0):
                    budget.hit()
                    return True
            budget.miss()
        while True:
            if poll(spin_ms):
                return True
            if not await orig():
                return False

    set_waiter(wait_fuse_readable)
    return True
