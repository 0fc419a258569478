"""containerd's snapshotter test suite (conformance_suite.py) through `fusesnap serve` and gRPC.

Each test gets its own store and daemon; the snapshotter it sees is the gRPC
client, and mounts are made from the Mount messages the daemon returns (as
containerd does), so the protobuf mapping, error codes and the daemon's
threads are all on the path.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conformance_suite import *  # noqa: F401,F403  (every check of the suite runs here)
from conformance_suite import NEEDS_ROOT
from fusesnap.daemon.client import RemoteSnapshotter, perform
from fusesnap.snapshots.mounting import umount
from fusesnap.snapshots.snapshotter import Snapshotter
from fusesnap.store.layerstore import LayerStore
from helpers import script

pytestmark = NEEDS_ROOT


class GrpcSnapshotter(RemoteSnapshotter):
    """The gRPC client plus what the suite inspects besides the API (store exports, chains)."""

    def __init__(self, address: Path, root: Path) -> None:
        super().__init__(address)
        self.root = root
        self.store = LayerStore(root)

    def mount(self, key: str, mountpoint: Path) -> int:
        perform(self.mounts(key), mountpoint)
        return 0

    def umount(self, mountpoint: Path) -> None:
        umount(mountpoint)

    def chain_of(self, key: str) -> list[str]:
        with Snapshotter(self.root) as sn:
            return sn.chain_of(key)

    def close(self) -> None:
        self.store.close()
        super().close()


@pytest.fixture
def env(shared_tmp):
    root, sock = shared_tmp / "root", shared_tmp / "fusesnap.sock"
    log = open(shared_tmp / "serve.log", "wb")
    proc = subprocess.Popen([script("fusesnap"), "--root", str(root), "serve", "--address", str(sock)],
                            stdout=subprocess.DEVNULL, stderr=log)
    sn = None
    try:
        sn = GrpcSnapshotter(sock, root)
        sn.wait_ready(30)
        work = shared_tmp / "work"
        work.mkdir()
        yield sn, work
    finally:
        if sn is not None:
            sn.close()
        proc.terminate()
        assert proc.wait(30) == 0          # a clean stop on SIGTERM
        log.close()
        assert not os.path.exists(sock)
