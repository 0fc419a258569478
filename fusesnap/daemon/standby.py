"""Mount-server workers started ahead for the daemon's next planned mounts.

A mount made ahead (bindmounts.py) is served by a worker of the mount server,
and containerd's first look into the new snapshot waits for that worker's
start. Part of the start does not depend on the mount: connecting to the
server, the server checking the peer's context, the worker's session, stdio
and environment, the warm-up of the mount code. A standby request
(cli/mountclient.py) does all of that before the mount exists; at Prepare the
daemon only sends the plan and the FUSE connection over the open socket.

STANDBYS are kept, so that containers started back to back (a CI job, a burst
of pods) find one each; a used one is replaced REFILL_DELAY later, in the
background. When none is ready the caller submits as before.

A standby whose daemon stops (or dies: its socket closes) ends without running
anything; one that died while waiting is found out at hand_over(), which then
tries the next one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from ..cli import mountclient
from ..cli.mountserver import PLANNED, STANDBY

log = logging.getLogger(__name__)

STANDBYS = 2              # workers kept waiting (each a forked, idle mount-server worker)
START_TIMEOUT = 30.0      # seconds a standby's worker may take to start
RETRY_MAX = 30.0          # seconds between attempts while no server takes a standby
REFILL_DELAY = 0.25       # seconds from a hand-over to starting the next standby


class Standby:
    """Keeps `size` started workers waiting; take one with hand_over()."""

    def __init__(self, shown: list[str], size: int = STANDBYS) -> None:
        self._shown = shown         # the standby's command line in ps until it is used
        self._size = size
        self._lock = threading.Lock()
        self._ready: list[tuple[socket.socket, int]] = []     # oldest first
        self._wanted = threading.Event()
        self._wanted.set()
        self._closing = threading.Event()
        threading.Thread(target=self._keep, name="standby", daemon=True).start()

    def hand_over(self, argv: list[str], orig_argv: list[str], fd: int) -> tuple[socket.socket, int] | None:
        """Give a waiting worker (the oldest: its warm-up is done) its command and fd: (the
        connection for mountclient.finish(started=True), the read end of its stderr), or
        None when no standby was ready or every one had gone (nothing ran)."""
        while True:
            with self._lock:
                got = self._ready.pop(0) if self._ready else None
            if got is None:
                return None
            self._wanted.set()
            if mountclient.hand_over(got[0], argv, orig_argv, fd):
                return got
            _let_go(got)            # died while waiting: the next one

    def close(self) -> None:
        """Let the waiting workers go (they exit without running anything)."""
        with self._lock:
            self._closing.set()
            ready, self._ready = self._ready, []
        self._wanted.set()
        for got in ready:
            _let_go(got)

    def _missing(self) -> bool:
        with self._lock:
            return not self._closing.is_set() and len(self._ready) < self._size

    def _keep(self) -> None:
        pause = 0.05
        delay = 0.0             # the first ones at once
        while True:
            self._wanted.wait()
            self._wanted.clear()
            # Not at once after a hand-over: the worker just handed its mount is starting,
            # and a new standby (a fork in the server, this thread's own Python) would
            # compete with it and with the rest of the Prepare for the CPUs.
            if self._closing.wait(delay):
                return
            delay = REFILL_DELAY
            while self._missing():
                got = self._start()
                if got is None:         # no server took it: later, less and less often
                    if self._closing.wait(pause):
                        return
                    pause = min(pause * 2, RETRY_MAX)
                    continue
                pause = 0.05
                with self._lock:
                    if not self._closing.is_set():
                        self._ready.append(got)
                        got = None
                if got is not None:     # closed meanwhile
                    _let_go(got)
                    return

    def _start(self) -> tuple[socket.socket, int] | None:
        try:
            got = mountclient.submit_watched(PLANNED, [STANDBY], None, self._shown)
        except OSError as e:
            log.debug("no standby mount worker: %s", e)
            return None
        if got is not None and not mountclient.wait_started(got[0], START_TIMEOUT):
            _let_go(got)
            return None
        return got


def _let_go(got: tuple[socket.socket, int]) -> None:
    """Close a standby's connection (its worker then exits, unused) and its stderr pipe."""
    got[0].close()
    os.close(got[1])
