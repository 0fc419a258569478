"""The mount command's side of the mount server (cli/mountserver.py).

A mount command that would daemonize hands its whole command line to a
resident server of the same user and context, which has pyfuse3, trio and the
CLI imported already and forks a child to run it: the child gets this
process's stdin, stdout, stderr and working directory (as descriptors), its
environment and umask, runs the command exactly as it would run here, and
reports the exit status once the mount is live. This process only waits.

Import cost is the point of this module: the os module, sys, marshal, _socket,
_sha256 and select, nothing else (no argparse, enum, typing, dataclasses, not
even `from __future__`), measured with `python -X importtime`.

Protocol (SOCK_SEQPACKET, one message each): the request is
marshal((1, kind, argv, orig_argv, environ, umask)) with SCM_RIGHTS
[stdin, stdout, stderr, cwd]; the server's worker answers b"S" when it starts
the command, then b"R<exit status>"; a server that will not serve this peer
answers b"N<reason>". Nothing has run before b"S", so a connection that ends
earlier (a server exiting on idle) is retried with a new server, and a client
that gave up waiting makes sure no b"S" can reach it first (shutdown).

A standby request (kind `fusesnap-planned`, argv ["-"]: cli/mountserver.py's
PLANNED and STANDBY) gets a worker that starts (b"S") and then
waits for the command itself: marshal((argv, orig_argv)) with SCM_RIGHTS
[one descriptor], sent by hand_over(); the worker sees it as /dev/fd/N at the
end of argv. A standby closed unused ends without running anything.
"""

import _sha256
import _socket
import marshal
import os
import select
import sys

from fusesnap.linux.procctx import context

SWITCH = "FUSESNAP_MOUNT_SERVER"          # "0": run every mount command in its own process
IDLE = "FUSESNAP_MOUNT_SERVER_IDLE"       # seconds a server it starts lives without a request (300)
_SERVER_MODULE = "fusesnap.cli.mountserver"
TITLE_SPACE = 16384                       # bytes of command line the server keeps for its daemons' titles
_START_TIMEOUT = 120.0                    # seconds a busy machine may take to start the worker
_MAX_REQUEST = 200_000                    # bytes one SEQPACKET message may carry (wmem_default)


def socket_name() -> bytes:
    """The abstract socket of the server for this process's context and this installation."""
    me = os.stat(__file__)
    install = f"{sys.executable}\0{sys.version}\0{me.st_dev}:{me.st_ino}:{me.st_mtime_ns}".encode()
    digest = _sha256.sha256(context() + b"\0" + install).hexdigest()[:32]
    return f"\0fusesnap-mountd-{os.geteuid()}-{digest}".encode()


def run(kind: str, argv: list[str], stdio: tuple[int, int, int] | None = None,
        orig_argv: list[str] | None = None) -> int | None:
    """Run `kind argv` through the server; its exit status, or None when it was not
    handed over (nothing ran: the caller runs the command itself). `stdio`: the
    command's stdin, stdout and stderr, `orig_argv`: the command line its process
    shows (defaults: this process's)."""
    for _ in range(3):
        sock = submit(kind, argv, stdio, orig_argv)
        if sock is None:
            return None
        rc = finish(sock)
        if rc != "retry":
            return rc
    return None


def submit(kind: str, argv: list[str], stdio: tuple[int, int, int] | None = None,
           orig_argv: list[str] | None = None) -> _socket.socket | None:
    """Hand `kind argv` to the server without waiting for it: the connection to give
    finish(), or None when it was not handed over (nothing will run). The descriptors
    are in the request once this returns; the caller may close its own."""
    if os.environ.get(SWITCH) == "0":
        return None
    try:
        name = socket_name()
        request = _request(kind, argv, stdio, sys.orig_argv if orig_argv is None else orig_argv)
    except OSError:
        return None
    if request is None:
        return None
    payload, fds = request
    try:
        for _ in range(3):
            sock = _connect(name, kind)
            if sock is None:
                return None
            if _send(sock, payload, fds):
                return sock
            sock.close()
        return None
    finally:
        os.close(fds[3])


def submit_watched(kind: str, argv: list[str], stdin: int | None,
                   orig_argv: list[str]) -> tuple[_socket.socket, int] | None:
    """submit() with stdout to /dev/null and stderr into a new pipe: (the connection,
    the read end of the command's stderr), or None when it was not handed over.
    stdin None: /dev/null."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    sock = None
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            sock = submit(kind, argv, stdio=(null if stdin is None else stdin, null, err_w), orig_argv=orig_argv)
        finally:
            os.close(null)
            os.close(err_w)
    finally:
        if sock is None:
            os.close(err_r)
    return None if sock is None else (sock, err_r)


def finish(sock: _socket.socket, on_start=None, started: bool = False) -> int | str | None:
    """Wait for a submitted command: its exit status, "retry" (the server went away
    before starting it: nothing ran, submit again) or None (refused: nothing ran).
    on_start() is called once a worker has taken the command (and its descriptors);
    started: it has (a standby that was handed its command)."""
    try:
        return _receive(sock, on_start, started)
    finally:
        sock.close()


def wait_started(sock: _socket.socket, timeout: float) -> bool:
    """Wait up to timeout seconds for a submitted standby's worker to start (b"S")."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    try:
        return bool(poller.poll(timeout * 1000)) and sock.recv(4096) == b"S"
    except OSError:
        return False


def hand_over(sock: _socket.socket, argv: list[str], orig_argv: list[str], fd: int) -> bool:
    """Give a started standby its command and descriptor; False if it is gone (nothing ran)."""
    return _send(sock, marshal.dumps((list(argv), list(orig_argv))), [fd])


def keep_alive(kind: str) -> bool:
    """Start the server for this context if none runs, else count as a request to it
    (an empty connection: its spare refuses it, and the server's idle time starts
    again); for a process that sends mounts now and then and should not wait for a
    server's start. True if a server runs."""
    if os.environ.get(SWITCH) == "0":
        return False
    try:
        sock = _connect(socket_name(), kind)
    except OSError:
        return False
    if sock is None:
        return False
    sock.close()
    return True


def idle_seconds() -> float:
    """How long a server this process starts lives without a request."""
    try:
        return float(os.environ.get(IDLE, "300"))
    except ValueError:
        return 300.0


def _request(kind: str, argv: list[str], stdio: tuple[int, int, int] | None,
             orig_argv: list[str]) -> tuple[bytes, list[int]] | None:
    if stdio is None:
        for fd in (0, 1, 2):           # a closed stdio descriptor cannot be sent: give it /dev/null
            try:
                os.fstat(fd)
            except OSError:
                os.open(os.devnull, os.O_RDWR)
        stdio = (0, 1, 2)
    payload = marshal.dumps((1, kind, list(argv), list(orig_argv), dict(os.environb), _umask()))
    if len(payload) > _MAX_REQUEST:
        return None
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return payload, [*stdio, cwd]


def _umask() -> int:
    """This process's umask, read without setting it (os.umask sets it, for a moment,
    for every thread of the process)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _connect(name: bytes, kind: str) -> _socket.socket | None:
    """A connection to the server, started first if there is none (None: cannot)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(name)
        return sock
    except OSError:
        pass
    if not _spawn_server(name, kind):
        sock.close()
        return None
    try:
        sock.connect(name)
        return sock
    except OSError:
        sock.close()
        return None


def _spawn_server(name: bytes, kind: str) -> bool:
    """Start a server for name; True once one listens there (this one or a racing one)."""
    r, w = os.pipe()
    try:
        os.set_inheritable(w, True)
        null = os.devnull
        actions = [(os.POSIX_SPAWN_OPEN, 0, null, os.O_RDWR, 0), (os.POSIX_SPAWN_DUP2, 0, 1),
                   (os.POSIX_SPAWN_DUP2, 0, 2)]
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "LC_CTYPE")}
        # -I: nothing from the cwd or PYTHON* variables gets imported into the server
        idle = str(idle_seconds())
        argv = [sys.executable, "-I", "-m", _SERVER_MODULE, name[1:].hex(), str(w), idle, kind,
                "-" * TITLE_SPACE]
        os.posix_spawn(sys.executable, argv, env, file_actions=actions, setsid=True)
    except OSError:
        os.close(r)
        return False
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        status = f.read()
    return status in (b"ok", b"exists")


def _send(sock: _socket.socket, payload: bytes, fds: list[int]) -> bool:
    fd_bytes = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
    try:
        sock.sendmsg([payload], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd_bytes)])
    except OSError:
        return False
    return True


def _receive(sock: _socket.socket, on_start, started: bool) -> int | str | None:
    """Wait for the worker's answers: exit status, "retry" (the server went away before
    starting anything) or None (refused: nothing ran)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    try:
        while True:
            if not started and not poller.poll(_START_TIMEOUT * 1000):
                return _give_up(sock)
            msg = sock.recv(4096)
            if not msg:
                if not started:
                    return "retry"
                print("fusesnap: the mount server's worker ended without an exit status", file=sys.stderr)
                return 1
            if msg == b"S":
                started = True
                if on_start is not None:
                    on_start()
            elif msg[:1] == b"R":
                return int(msg[1:])
            elif msg[:1] == b"N" and not started:
                return None
    except KeyboardInterrupt:
        return 130
    except OSError:
        if not started:
            return "retry"
        print("fusesnap: lost the mount server's worker before it reported", file=sys.stderr)
        return 1


def _give_up(sock: _socket.socket) -> int | None:
    """No worker started in time: shut the connection so that none can start after
    this returns, unless one did just now (then wait for it after all)."""
    sock.shutdown(_socket.SHUT_RDWR)
    try:
        sock.setblocking(False)
        msg = sock.recv(4096)
    except OSError:
        return None
    if msg != b"S":
        return None
    print("fusesnap: the mount server started the command late and no longer reports to it",
          file=sys.stderr)
    return 1
