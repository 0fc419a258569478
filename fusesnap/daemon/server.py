"""The daemon's life: socket path and mode, gRPC server, readiness, signals, clean stop.

The daemon holds no state of its own: snapshots live in the store (SQLite and
the snapshot dirs) and the mounts containerd performs are separate FUSE
processes, so a restarted daemon finds everything again and running
containers never notice it was gone.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from concurrent import futures
from pathlib import Path

import grpc

from ..errors import FusesnapError, InvalidInput
from .pb import snapshots_pb2_grpc as pb_grpc
from .bindmounts import BindMounts
from .service import SnapshotsService

log = logging.getLogger(__name__)

SOCKET_NAME = "fusesnap.sock"
SOCKET_MODE = 0o660
DEFAULT_WORKERS = 8
# bind: the daemon mounts each snapshot and returns a bind of it; fuse3: containerd runs
# mount.fuse3 with `fusesnap` (docs/ARCHITECTURE.md, "containerd": why bind is the default)
MOUNT_MODES = ("bind", "fuse3")
DEFAULT_MOUNT_MODE = "bind"


def default_address() -> Path:
    """/run/fusesnap/fusesnap.sock as root, $XDG_RUNTIME_DIR/fusesnap/fusesnap.sock otherwise."""
    if os.geteuid() == 0:
        return Path("/run/fusesnap") / SOCKET_NAME
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        raise InvalidInput("XDG_RUNTIME_DIR is not set: pass --address SOCKET")
    return Path(runtime) / "fusesnap" / SOCKET_NAME


def mount_dir(address: Path) -> Path:
    """Where the daemon's own mounts live (bind mode): beside the socket, per socket."""
    return address.parent / f"{address.name}.mounts"


def _claim_socket_path(path: Path) -> None:
    """Make way for our socket: create its directory, remove a stale socket, refuse a live one."""
    path.parent.mkdir(mode=0o711 if os.geteuid() == 0 else 0o700, parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidInput(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        path.unlink(missing_ok=True)       # left by a daemon that died: nobody listens
        return
    finally:
        probe.close()
    raise FusesnapError(f"another daemon is already serving on {path}")


def notify_ready() -> None:
    """Tell systemd (Type=notify) that the socket accepts calls."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"READY=1", addr)
        except OSError as e:
            log.warning("could not notify systemd: %s", e)


class Daemon:
    """A started gRPC server for one store on one unix socket."""

    def __init__(self, root: Path, address: Path, workers: int = DEFAULT_WORKERS,
                 mount_mode: str = DEFAULT_MOUNT_MODE) -> None:
        self.address = Path(os.path.abspath(address))
        if workers < 1:
            raise InvalidInput(f"--workers must be at least 1, not {workers}")
        if mount_mode not in MOUNT_MODES:
            raise InvalidInput(f"unknown mount mode {mount_mode!r} (known: {', '.join(MOUNT_MODES)})")
        _claim_socket_path(self.address)
        binds = BindMounts(Path(root), mount_dir(self.address)) if mount_mode == "bind" else None
        self.service = SnapshotsService(root, binds)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                             thread_name_prefix="snapshots"))
        pb_grpc.add_SnapshotsServicer_to_server(self.service, self.server)
        old = os.umask(0o177)      # the socket is born 0600, then opened up to exactly 0660
        try:
            port = self.server.add_insecure_port(f"unix:{self.address}")
        finally:
            os.umask(old)
        if port == 0:
            self.service.close()
            raise FusesnapError(f"cannot listen on {self.address}")
        os.chmod(self.address, SOCKET_MODE)
        self.server.start()

    def stop(self, grace: float) -> None:
        """Refuse new calls, let running ones finish for up to `grace` seconds, then release the store."""
        self.server.stop(grace).wait()
        self.service.close()
        try:
            self.address.unlink()
        except FileNotFoundError:
            pass
