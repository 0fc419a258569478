"""The mount server: a resident process with the FUSE stack imported that runs each mount in a fork of itself.

Starting Python and importing trio and pyfuse3 costs ~80-100 ms, which every
`fusesnap-overlay` and `fusesnap mount` used to pay before its mount could
answer a request. The server pays it once: the first mount command of a user
(in one context, cli/mountclient.py) starts it, and every mount command then
hands its command line over. A worker forked from the server runs the command
exactly as the command's own process would (its stdio, cwd, environment and
umask passed along), and so mounts and serves with nothing left to import.
Workers share the server's imported modules copy-on-write, which is also what
keeps many live mounts cheap in memory (docs/ARCHITECTURE.md, "Mount start-up").

The fork is off the critical path: one spare worker, forked ahead and warmed
up (trio run once, so its pages are copied before a request waits on them),
waits in accept(); when it takes a connection it tells the server, which
forks the next spare. A worker that loaded a lower-tree cache file names it
to the server, which loads it too and forks a new spare that has it: the next
mount of that chain loads nothing.

A request's KIND names the command: `fusesnap` or `fusesnap-overlay` (a
command line, run as its console script would), or `fusesnap-planned`: a
connection `fusesnap serve` mounted itself and the plan of what it is
(snapshots/mounting.py, mount_plan), which the worker serves without opening
the store. A standby request (argv ["-"]) starts its worker at once and sends
the command later (cli/mountclient.py): `fusesnap serve` keeps one so that its
next mount skips the connect, the peer check and the worker's set-up.

Only peers of the same context are served (linux/procctx.py): same user,
groups, capabilities, namespaces, cgroup, root, limits and LSM label, checked
on the sending process the kernel names (SCM_CREDENTIALS) while it is still
alive. The server exits after FUSESNAP_MOUNT_SERVER_IDLE seconds (the
client's setting when it started it; default 300) without a request, and as
soon as no process but its own is left in its mount namespace (`unshare -m sh
-c 'mount ...'` has ended): it would otherwise keep that namespace, and with it
every mount it copied from its parent, alive for nothing.

Run as `python -I -m fusesnap.cli.mountserver NAME_HEX STATUS_FD IDLE KIND
PADDING` by the client; it reports b"ok" (listening) or b"exists" (another
server won the name) on STATUS_FD before it imports anything heavy, so that
the client can connect at once: its request waits in the backlog meanwhile.
It imports what the KIND of command that started it needs first (the store's
modules are ~35 ms that `fusesnap-overlay` does not need), and another kind's
once the first such command came.
"""

from __future__ import annotations

import os
import sys

_PR_SET_PDEATHSIG = 1
_CHECK = 2.0        # seconds between looks for company in the mount namespace while idle


def main(argv: list[str]) -> int:
    name_hex, status_fd, idle, kind = argv[0], int(argv[1]), float(argv[2]), argv[3]
    # Nothing the starting command had open may stay open here for minutes (a caller
    # reading a pipe to EOF would hang): only the status pipe survives.
    os.closerange(3, status_fd)
    os.closerange(status_fd + 1, 1 << 20)
    os.chdir("/")

    import socket

    from fusesnap.linux.proctitle import set_title

    set_title([f"fusesnap-mountd (uid {os.geteuid()})"])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)   # accepted sockets inherit it
    try:
        sock.bind(b"\0" + bytes.fromhex(name_hex))
        sock.listen(128)
    except OSError as e:
        os.write(status_fd, b"exists" if e.errno == 98 else str(e).encode())   # EADDRINUSE
        return 0
    os.write(status_fd, b"ok")
    os.close(status_fd)
    loaded = {kind} if _preload(BASE + PRELOAD.get(kind, ())) else set()
    Server(sock, idle, loaded).run()
    return 0


# What mount commands import; a worker finds them loaded (and shares their pages).
BASE = (
    "pickle", "logging", "contextlib", "subprocess", "traceback", "struct", "marshal", "select", "signal",
    "ctypes", "pyfuse3", "trio",
    "fusesnap.linux.procctx", "fusesnap.fs.options", "fusesnap.fs.fuse.mount", "fusesnap.fs.fuse.operations",
    "fusesnap.fs.fuse.fastloop", "fusesnap.fs.fuse.readahead", "fusesnap.fs.fuse.splicing",
    "fusesnap.fs.core.lowertree", "fusesnap.fs.core.lower",
)
# How long a new spare waits for a connection before it warms up the mount code too: it is
# forked as its predecessor takes a connection, whose mount should not share the CPUs with it.
SPARE_WARM_DELAY_MS = 100
PLANNED = "fusesnap-planned"   # a mount `fusesnap serve` planned and mounted (cmd_mount_planned)
STANDBY = "-"                  # a PLANNED request's argv when its command comes later (mountclient.hand_over)
PRELOAD = {
    "fusesnap-overlay": ("fusesnap.cli.overlay", "fusesnap.fs.core.lazytree"),
    "fusesnap": ("fusesnap.cli.main", "fusesnap.cli.snapshots", "fusesnap.snapshots.snapshotter",
                 "fusesnap.snapshots.mounting", "fusesnap.snapshots.treecache", "fusesnap.store.layerstore",
                 "json"),
    PLANNED: ("fusesnap.cli.main", "fusesnap.cli.snapshots", "fusesnap.snapshots.mounting", "json"),
}


def _preload(names: tuple[str, ...]) -> bool:
    """Import names (False if one failed: the worker meets and reports the same error)."""
    import importlib

    ok = True
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:   # noqa: BLE001
            ok = False
    _freeze()
    return ok


def _freeze() -> None:
    """Workers never collect what the server holds: their collections then do not
    touch (and copy) the shared pages."""
    import gc

    gc.collect()
    gc.freeze()


class Server:
    """The parent: keeps one spare worker ready, loads what workers report, exits when idle."""

    def __init__(self, sock, idle: float, loaded: set[str]) -> None:
        import signal

        signal.signal(signal.SIGCHLD, signal.SIG_IGN)      # workers are reaped by the kernel
        self.sock = sock
        self.idle = idle
        self.loaded = loaded
        self.notes_r, self.notes_w = os.pipe2(os.O_CLOEXEC)
        self.spare_pid = 0
        self.spare_pidfd = -1
        self.retire_w = -1

    def run(self) -> None:
        import select
        import time

        self._fork_spare()
        last = time.monotonic()
        buf = b""
        while True:
            poller = select.poll()
            poller.register(self.notes_r, select.POLLIN)
            poller.register(self.spare_pidfd, select.POLLIN)
            left = self.idle - (time.monotonic() - last)
            if left <= 0:
                break
            if not poller.poll(min(left, _CHECK) * 1000):
                if _alone_in_mount_namespace():
                    break
                continue
            if _readable(self.notes_r):
                buf += os.read(self.notes_r, 65536)
            *lines, buf = buf.split(b"\n")
            refork = False
            for line in lines:
                if line[:1] == b"T":                  # a spare took a request: "T<pid> <kind>"
                    last = time.monotonic()
                    pid, _, kind = line[1:].decode(errors="replace").partition(" ")
                    if pid == str(self.spare_pid):
                        self._release_spare()
                        refork = True
                    if kind in PRELOAD and kind not in self.loaded:
                        self.loaded.add(kind)          # it imported them itself; the next ones find them
                        _preload(PRELOAD[kind])
                elif line[:1] in (b"L", b"U"):        # a worker loaded a lower tree / used a kept one
                    refork = self._keep(os.fsdecode(line[1:])) or refork
            if self.spare_pidfd >= 0 and _readable(self.spare_pidfd):
                self._release_spare()                 # it died without taking anything
                refork = True
            if refork:
                self._retire_spare()
                self._fork_spare()
        self._retire_spare()

    def _keep(self, path: str) -> bool:
        from fusesnap.fs.fuse import mount

        try:
            if not mount.keep_tree(path):
                return False
        except Exception:   # noqa: BLE001 -- a bad cache file: workers rebuild it
            return False
        _freeze()
        return True

    def _fork_spare(self) -> None:
        retire_r, self.retire_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(self.retire_w)
            os.close(self.notes_r)
            _spare(self.sock, retire_r, self.notes_w, os.getppid())     # never returns
        os.close(retire_r)
        self.spare_pid = pid
        self.spare_pidfd = os.pidfd_open(pid)

    def _release_spare(self) -> None:
        """The spare became a worker (or died): no longer ours to retire."""
        if self.spare_pidfd >= 0:
            os.close(self.spare_pidfd)
            os.close(self.retire_w)
        self.spare_pidfd = self.retire_w = -1

    def _retire_spare(self) -> None:
        """Tell a spare that has taken nothing to exit (it may take a request first)."""
        if self.retire_w >= 0:
            try:
                os.write(self.retire_w, b"x")
            except OSError:
                pass
        self._release_spare()


def _alone_in_mount_namespace() -> bool:
    """No process but this one and its children (spare, workers) in its mount
    namespace, among those this process may look at."""
    me = os.getpid()
    ns = os.readlink("/proc/self/ns/mnt")
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            if os.readlink(f"/proc/{d}/ns/mnt") != ns:
                continue
            with open(f"/proc/{d}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid != me:
            return False
    return True


def _readable(fd: int) -> bool:
    import select

    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def _spare(sock, retire_r: int, notes_w: int, server: int) -> None:
    """A forked spare: warm up, wait for a connection (or to be retired), become its worker."""
    import ctypes
    import select

    code = 0
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, 15, 0, 0, 0)   # SIGTERM once the server is gone
        if os.getppid() != server:
            os._exit(0)                       # it went before that took effect
        _warm_up()
        from fusesnap.linux.procctx import context

        own = context()
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(retire_r, select.POLLIN)
        sock.setblocking(False)
        wait_ms = SPARE_WARM_DELAY_MS
        while True:
            ready = dict(poller.poll(wait_ms))
            if not ready:               # idle: the mount code's own warm-up (fs.fuse.mount.warm_up)
                from fusesnap.fs.fuse import mount

                mount.warm_up()
                wait_ms = -1
                continue
            if sock.fileno() in ready:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue
                if _peer_uid(conn) == os.geteuid():
                    break
                _refuse(conn, "another user", unread=True)    # and stay the spare: no fork for strangers
                continue
            if retire_r in ready:
                os._exit(0)
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0)    # a worker outlives the server
        os.close(retire_r)
        sock.close()
        conn.setblocking(True)
        _take(conn, notes_w, own)             # never returns when it runs the command
    except BaseException:   # noqa: BLE001 -- a spare that fails just goes
        code = 1
    os._exit(code)


def _warm_up() -> None:
    """Run once what every worker runs, so that the copy-on-write faults of the fork
    are paid before a request waits on them (a first trio.run in a fresh fork: ~2 ms,
    a later one ~0.3 ms): trio with a nursery and a signal receiver as the request
    loop has them, stdio objects, the request's decoding."""
    import io
    import marshal
    import signal

    import trio

    async def loop_like() -> None:
        async with trio.open_nursery() as n:
            with trio.open_signal_receiver(signal.SIGHUP):
                n.start_soon(trio.sleep, 0)

    trio.run(loop_like)
    with open(os.devnull, "rb", buffering=0) as raw:
        io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8").read()
    _decode(marshal.dumps((1, "", [], [], dict(os.environb), 0)))


def _take(conn, notes_w: int, own: bytes) -> None:
    """Read the request of an accepted connection, check the peer, run the command."""
    import select
    import socket
    import struct

    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    ready = poller.poll(5000)
    msg, anc, flags = b"", [], 0
    if ready:
        msg, anc, flags, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 4) + socket.CMSG_SPACE(12))
    fds = _passed_fds(anc)
    cred = None
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            cred = struct.unpack("3i", data[:12])
    request = _decode(msg)
    _note(notes_w, b"T%d %s" % (os.getpid(), request[1].encode() if request else b""))
    why = _refusal(cred, fds, flags, request, own)
    if why:
        for fd in fds:
            os.close(fd)
        _refuse(conn, why)
        return
    _worker(conn, notes_w, request, fds)


def _peer_uid(conn) -> int:
    import socket
    import struct

    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]


def _refuse(conn, why: str, unread: bool = False) -> None:
    """Answer N<why> and close. An unread request is read first (waiting up to 0.1 s
    for it): closing with it unread would reset the connection and lose the answer."""
    import select
    import socket

    try:
        conn.send(b"N" + why.encode())
        p = select.poll()
        p.register(conn.fileno(), select.POLLIN)
        if unread and p.poll(100):
            conn.recv(1 << 20, socket.MSG_DONTWAIT)
    except OSError:
        pass
    conn.close()


def _decode(msg: bytes) -> tuple | None:
    import marshal

    try:
        request = marshal.loads(msg)
    except Exception:   # noqa: BLE001
        return None
    return request if isinstance(request, tuple) and len(request) == 6 and request[0] == 1 else None


def _note(notes_w: int, line: bytes) -> None:
    try:
        os.write(notes_w, line + b"\n")
    except OSError:
        pass


def _refusal(cred, fds: list[int], flags: int, request: tuple | None, own: bytes) -> str | None:
    """Why this request is not served, or None."""
    import select
    import socket

    from fusesnap.linux.procctx import context

    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 4 or request is None:
        return "malformed request"
    if cred is None or cred[1] != os.geteuid():
        return "another user"
    try:
        pidfd = os.pidfd_open(cred[0])
    except OSError:
        return "the sender is gone"
    try:
        same = context(cred[0]) == own
        gone = select.poll()
        gone.register(pidfd, select.POLLIN)
        if gone.poll(0):      # exited: its pid may have named another process meanwhile
            return "the sender is gone"
    finally:
        os.close(pidfd)
    return None if same else "another context"


def _worker(conn, notes_w: int, request: tuple, fds: list[int]) -> None:
    """Become the command's process, run it, report its exit status."""
    import signal

    rc = 1
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _, kind, argv, orig_argv, environ, umask = request
        for target, fd in enumerate(fds[:3]):
            os.dup2(fd, target)
        os.fchdir(fds[3])
        for fd in fds:
            os.close(fd)
        fds.clear()
        _reopen_stdio()
        os.umask(umask)
        os.environb.clear()
        os.environb.update(environ)
        sys.argv = list(orig_argv[1:2]) + list(argv)     # [the console script, *argv]
        from fusesnap.fs.fuse import mount
        from fusesnap.linux.proctitle import set_title

        set_title(orig_argv, os.path.basename(sys.argv[0]) if sys.argv else None)
        try:
            conn.send(b"S")
        except OSError:
            os._exit(0)              # the client gave up: run nothing
        if kind == PLANNED and argv == [STANDBY]:
            mount.warm_up()
            command = _command_of_standby(conn)
            if command is None:
                os._exit(0)          # let go unused: nothing ran
            argv, orig_argv = command
            sys.argv = list(orig_argv[1:2]) + list(argv)
            set_title(orig_argv, os.path.basename(sys.argv[0]) if sys.argv else None)

        def live(code: int) -> None:
            _report(conn, code)
            for path in mount.loaded_from_disk:
                _note(notes_w, b"L" + os.fsencode(path))
            for path in mount.used_kept:
                _note(notes_w, b"U" + os.fsencode(path))
            os.close(notes_w)

        # A mount that goes live is served by this worker; the client goes on then.
        mount.serve_here(live)
        rc = _run(kind, argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:   # noqa: BLE001 -- shown as the command's own process would show it
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        _report(conn, rc)
        from fusesnap.fs.fuse import mount

        served = mount.serve_pending()      # the command is done; its mount lives on here
        os._exit(rc if served is None else served)


def _passed_fds(anc: list) -> list[int]:
    """The descriptors a message's ancillary data (recvmsg) carried (SCM_RIGHTS)."""
    import socket

    return [int.from_bytes(data[i:i + 4], sys.byteorder) for level, kind, data in anc
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS for i in range(0, len(data) - 3, 4)]


def _command_of_standby(conn) -> tuple[list[str], list[str]] | None:
    """Wait for a standby's command (cli/mountclient.py, hand_over): (argv ending in
    /dev/fd/N for the descriptor that came with it, orig_argv), None if the client
    closed the connection or sent something else."""
    import marshal
    import socket

    try:
        # (the connection passes credentials too: SO_PASSCRED, inherited from the listener)
        msg, anc, flags, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(4) + socket.CMSG_SPACE(12),
                                          socket.MSG_CMSG_CLOEXEC)
    except OSError:
        return None
    fds = _passed_fds(anc)
    try:
        argv, orig_argv = marshal.loads(msg)
        ok = len(fds) == 1 and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
        ok = ok and all(isinstance(a, str) for a in [*argv, *orig_argv])
    except (EOFError, ValueError, TypeError):
        ok = False
    if not ok:
        for fd in fds:
            os.close(fd)
        return None
    return [*argv, f"/dev/fd/{fds[0]}"], orig_argv


def _report(conn, code: int) -> None:
    """The command's exit status to the client, once (with everything it printed)."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    if conn.fileno() >= 0:
        try:
            conn.send(b"R%d" % code)
        except OSError:
            pass
        conn.close()


def _reopen_stdio() -> None:
    """sys.stdin/stdout/stderr for the descriptors just received, set up as Python
    sets them up at start (line-buffered on a terminal)."""
    import io

    def text(fd: int, mode: str, errors: str) -> io.TextIOWrapper:
        raw = io.FileIO(fd, mode, closefd=False)
        tty = raw.isatty()
        buf = io.BufferedReader(raw) if mode == "r" else io.BufferedWriter(raw)
        return io.TextIOWrapper(buf, encoding="utf-8", errors=errors, line_buffering=tty or fd == 2,
                                write_through=fd == 2)

    sys.stdin = text(0, "r", "strict")
    sys.stdout = text(1, "w", "strict")
    sys.stderr = text(2, "w", "backslashreplace")


def _run(kind: str, argv: list[str]) -> int:
    if kind == "fusesnap-overlay":
        from fusesnap.cli import overlay

        return overlay.main(argv)
    from fusesnap.cli import main

    if kind == PLANNED:      # [plan as JSON, /dev/fd/N]: see cli/snapshots.py cmd_mount_planned
        from types import SimpleNamespace

        from fusesnap.cli import snapshots

        return main.run(SimpleNamespace(func=snapshots.cmd_mount_planned, plan=argv[0], mountpoint=argv[1],
                                        foreground=False))
    return main.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
