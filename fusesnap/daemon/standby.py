"""One mount-server worker started ahead for the daemon's next planned mount.

A mount made ahead (bindmounts.py) is served by a worker of the mount server,
and containerd's first look into the new snapshot waits for that worker's
start. Part of the start does not depend on the mount: connecting to the
server, the server checking the peer's context, the worker's session, stdio
and environment. A standby request (cli/mountclient.py) does all of that before
the mount exists; at Prepare the daemon only sends the plan and the FUSE
connection over the open socket. One standby is kept at a time, replaced in
the background after each use; when none is ready the caller submits as before.

A standby whose daemon stops (or dies: its socket closes) ends without running
anything; one that died while waiting makes hand_over() fail, and the caller
falls back to a fresh worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from ..cli import mountclient
from ..cli.mountserver import PLANNED, STANDBY

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0      # seconds a standby's worker may take to start
RETRY_MAX = 30.0          # seconds between attempts while no server takes a standby
REFILL_DELAY = 0.25       # seconds from a hand-over to starting the next standby


class Standby:
    """Keeps one started worker waiting; take one with hand_over()."""

    def __init__(self, shown: list[str]) -> None:
        self._shown = shown         # the standby's command line in ps until it is used
        self._lock = threading.Lock()
        self._ready: tuple[socket.socket, int] | None = None
        self._wanted = threading.Event()
        self._wanted.set()
        self._closing = threading.Event()
        threading.Thread(target=self._keep, name="standby", daemon=True).start()

    def hand_over(self, argv: list[str], orig_argv: list[str], fd: int) -> tuple[socket.socket, int] | None:
        """Give the waiting worker its command and fd: (the connection for
        mountclient.finish(started=True), the read end of its stderr), or None when no
        standby was ready or it had gone (nothing ran)."""
        with self._lock:
            got, self._ready = self._ready, None
        if got is None:
            return None
        self._wanted.set()
        if mountclient.hand_over(got[0], argv, orig_argv, fd):
            return got
        _let_go(got)
        return None

    def close(self) -> None:
        """Let the waiting worker go (it exits without running anything)."""
        with self._lock:
            self._closing.set()
            got, self._ready = self._ready, None
        self._wanted.set()
        if got is not None:
            _let_go(got)

    def _keep(self) -> None:
        pause = 0.05
        first = True
        while True:
            self._wanted.wait()
            self._wanted.clear()
            # Not at once after a hand-over: the worker just handed its mount is starting,
            # and a new standby (a fork in the server, this thread's own Python) would
            # compete with it and with the rest of the Prepare for the CPUs.
            if self._closing.wait(0 if first else REFILL_DELAY):
                return
            first = False
            got = self._start()
            with self._lock:
                if not self._closing.is_set() and got is not None:
                    self._ready, got = got, None
            if got is not None:            # closed meanwhile
                _let_go(got)
                return
            if self._ready is None:        # no server took it: later, less and less often
                if self._closing.wait(pause):
                    return
                self._wanted.set()
                pause = min(pause * 2, RETRY_MAX)
            else:
                pause = 0.05

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
