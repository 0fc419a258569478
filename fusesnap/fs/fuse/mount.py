"""Mounting a Union with pyfuse3: foreground or daemonized once the mount is live.

Importing pyfuse3 and trio is most of what a mount costs (tens of ms). This
module therefore imports neither at load time: `mount()` imports them when
called, and `spawn_daemon()` forks the daemon *first*, so that it imports them
on the other core while the caller is still opening the store and picking the
lower tree; `PendingDaemon.start()` then hands it what to mount and returns
once the mount is live, exactly like `mount()`.

In a worker of the mount server (cli/mountserver.py), which has all of that
imported already, `serve_here()` turns daemonizing into serving in the worker
itself: once the mount is live the worker reports success to the command that
waits for it and goes on serving, and no daemon is forked.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable

from fusesnap.errors import FusesnapError
from fusesnap.fs.core.permissions import Permissions
from fusesnap.fs.options import MountOptions
from fusesnap.linux import flock, fuseconn, libc
from fusesnap.linux.kernel import in_initial_user_namespace

if TYPE_CHECKING:
    from pathlib import Path

    from fusesnap.fs.core.lowertree import LowerTree
    from fusesnap.fs.fuse.operations import Operations
    from fusesnap.fs.core.union import Union

# What a pending daemon mounts as its lower tree (it builds the tree itself):
#   ("cache", path)          LowerTree.load(path), the snapshotter's per-chain cache
#   ("dirs", [dir...], eager) host directories, top-most first (LazyLowerTree, or eager)
#   ("empty",)               no lower layers
TreeSpec = tuple

_TREE_FAILED = b"\0tree\0"   # notify-pipe prefix: the daemon could not build the lower tree

# A lock the daemon holds for as long as it serves (linux/flock.py), so that others can
# tell it is alive whatever mount namespace it mounted in: (path, shared, message if taken).
Lock = tuple[str, bool, str]
# The lock fd of the mount this process serves (at most one per process), closed when it ends.
_held_locks: list[int] = []


class TreeUnavailable(FusesnapError):
    """A pending daemon could not build its lower tree (nothing was mounted).

    The caller may fall back to building the tree itself and calling mount()."""


def fuse_options(union: Union, opts: MountOptions) -> set[str]:
    """The FUSE mount options of a Union built with opts."""
    return _fuse_options(opts, union.readonly, union.kernel_checks_permissions)


def planned_fuse_options(opts: MountOptions, readonly: bool) -> set[str]:
    """What fuse_options() will give the Union that opts build (readonly: a view), known
    before it is built: for a process that mounts the connection (fs/fuseconn.py) while
    the daemon that serves it is still starting."""
    perms = Permissions(os.geteuid(), bool(opts.allow_other), bool(opts.default_permissions))
    return _fuse_options(opts, readonly or opts.read_only, perms.kernel_checks)


def _fuse_options(opts: MountOptions, readonly: bool, kernel_checks: bool) -> set[str]:
    """The FUSE mount options: nodev,nosuid and no allow_other unless asked for.

    Root of the initial user namespace gets the same defaults as everyone: an
    image's device nodes and setuid binaries must not reach the host's users.
    Root of another user namespace (rootless podman's mount program, which can
    pass `allow_other` but no `suid`) gets allow_other and suid by default, as
    fuse-overlayfs gives it: the kernel confines both to that namespace."""
    o = {f"fsname={opts.fsname}", "subtype=fusesnap"}
    # root of a user namespace (rootless podman's mount program, `unshare -Ur`): the kernel
    # admits only that namespace's processes, lets setuid reach only its ids, ignores devices
    confined = os.geteuid() == 0 and not in_initial_user_namespace()
    asked = set(opts.fuse_options)
    if kernel_checks:
        o.add("default_permissions")
    if opts.allow_other if opts.allow_other is not None else confined:
        o.add("allow_other")
    if readonly:
        o.add("ro")
    if not opts.keep_atime and "atime" not in asked:
        # as fuse-overlayfs: reads through the mount would otherwise invalidate every
        # file's cached attributes (atime) and cost a GETATTR per stat afterwards
        o.add("noatime")
    if not asked & {"suid", "nosuid"}:
        o.add("suid" if confined else "nosuid")
    if not asked & {"dev", "nodev"}:
        o.add("nodev")
    o.update(asked)
    return o


def mountable(mountpoint: str) -> bool:
    """A directory, or `/dev/fd/N` naming a FUSE connection mounted already (fuseconn)."""
    fd = fuseconn.connection_fd(mountpoint)
    return os.path.isdir(mountpoint) if fd is None else fuseconn.is_connection(fd)


def mount(tree: LowerTree, upper: Path | str | None, work: Path | str | None,
          mountpoint: Path | str, opts: MountOptions | None = None, foreground: bool = False,
          lock: Lock | None = None) -> int:
    """Mount; return 0 once the mount is live (the daemon keeps serving), else 1.

    With foreground=True, serve in this process until unmounted and return then.
    With lock, the serving process holds it (taken before mounting) until it exits."""
    opts = opts or MountOptions()
    mountpoint = os.path.abspath(mountpoint)
    try:
        if not mountable(mountpoint):
            raise FusesnapError(f"mountpoint {mountpoint!r} does not exist or is not a directory")
        from fusesnap.fs.fuse.operations import Operations
        from fusesnap.fs.core.union import Union
        union = Union(tree, upper, work, opts)
    except (OSError, FusesnapError) as e:
        print(f"fusesnap: cannot mount {mountpoint}: {e}", file=sys.stderr)
        return 1
    ops = Operations(union)
    fopts = fuse_options(union, opts)
    if foreground:
        return _serve(ops, mountpoint, fopts, None, opts.debug, lock)
    if _report_live is not None:
        return _serve_here(ops, mountpoint, fopts, opts.debug, lock)
    r, w = os.pipe()
    _fork_daemon(lambda: _serve(ops, mountpoint, fopts, _pipe_note(w), opts.debug, lock), close_in_child=(r,))
    os.close(w)
    msg = _read_all(r)
    if msg.startswith(b"ok"):
        return 0
    print(f"fusesnap: cannot mount {mountpoint}: {_reason(msg)}", file=sys.stderr)
    return 1


_warmed = False     # warm_up() ran in this process
# default_busy_poll_us() as warm_up() found it: its first call here reads the cgroup tree
_busy_poll_default: int | None = None
# Set in a mount server's worker: called with 0 once its mount is live (serve_here).
_report_live: Callable[[int], None] | None = None
# The mount that went live in this process and waits to be served (serve_here).
_pending: Callable[[], int] | None = None


def serve_here(report_live: Callable[[int], None]) -> None:
    """Daemonizing mounts serve in this process from now on: report_live(0) once the
    mount is live, and the command returns 0 as if a daemon served it; then
    serve_pending() serves it (this process belongs to the mount alone: a mount
    server's worker). Serving waits until the command has returned, so that what
    it opened (the store's databases) is closed, not kept for the mount's life."""
    global _report_live
    _report_live = report_live


def serving_here() -> bool:
    """Whether this process will serve the mounts it makes (serve_here)."""
    return _report_live is not None


def serve_pending() -> int | None:
    """Serve the mount that went live here until it is unmounted; its exit code, or
    None when there is none."""
    global _pending
    serve, _pending = _pending, None
    return serve() if serve is not None else None


def _serve_here(ops: Operations, mountpoint: str, fopts: set[str], debug: bool, lock: Lock | None) -> int:
    """Mount for serve_pending(); 0 once live, 1 with the reason on stderr if not."""
    global _pending
    said: list[bytes] = []

    def note(msg: bytes) -> None:
        said.append(msg)
        if msg == b"ok" and _report_live is not None:
            _report_live(0)

    if _go_live(ops, mountpoint, fopts, note, debug, lock):
        _pending = lambda: _serve_live(ops, mountpoint, debug)   # noqa: E731
        return 0
    print(f"fusesnap: cannot mount {mountpoint}: {_reason(said[0] if said else b'')}", file=sys.stderr)
    return 1


def _pipe_note(fd: int) -> Callable[[bytes], None]:
    """How a forked daemon tells the process waiting on a pipe: b"ok" or why not."""
    def note(msg: bytes) -> None:
        try:
            os.write(fd, msg)
        except OSError:
            pass
        os.close(fd)
    return note


def _fork_daemon(body: Any, close_in_child: tuple[int, ...] = ()) -> None:
    """Run body() in a daemon: double fork, so it is init's child and long-lived
    callers (the snapshotter, tests) collect no zombies. Returns once the
    intermediate child has exited; body's return value is the daemon's exit code."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd in close_in_child:
                os.close(fd)
            os.setsid()
            if os.fork() == 0:
                code = body()
            else:
                code = 0
        finally:
            os._exit(code)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _read_all(fd: int) -> bytes:
    chunks = []
    try:
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _reason(msg: bytes) -> str:
    return msg.decode(errors="replace").strip() or "the filesystem daemon exited before the mount was live"


def warm_up() -> None:
    """Build a union and its operations over an empty tree, and drop them, and work out
    the busy-poll default (once per process): in a mount server's idle spare or a
    standby worker waiting for its mount, the copy-on-write faults and first calls of
    that code are then paid before a mount waits on them. (The spare has run trio's
    loop once already: cli/mountserver.py, _warm_up.)"""
    global _warmed, _busy_poll_default
    if _warmed:
        return
    _warmed = True
    try:
        from fusesnap.fs.core.union import Union
        from fusesnap.fs.fuse import fastloop
        from fusesnap.fs.fuse.operations import Operations

        opts = MountOptions()
        union = Union(_build_tree(("empty",)), None, None, opts)
        fuse_options(union, opts)
        Operations(union)
        _busy_poll_default = fastloop.default_busy_poll_us()
    except Exception:   # noqa: BLE001 -- only a head start: the mount itself reports what fails
        pass


def spawn_daemon() -> "PendingDaemon | HereDaemon":
    """Fork a daemon now; it imports pyfuse3/trio while the caller prepares the mount
    (in a mount server's worker: this process will serve, see serve_here).

    Use it as a context manager: leaving the block without start() lets the
    daemon exit without mounting anything."""
    return HereDaemon() if _report_live is not None else PendingDaemon()


class HereDaemon:
    """PendingDaemon's interface for a process that serves its mount itself."""

    def start(self, tree: TreeSpec, upper: Path | str | None, work: Path | str | None,
              mountpoint: Path | str, opts: MountOptions | None = None, lock: Lock | None = None) -> int:
        """As PendingDaemon.start; on success the mount waits for serve_pending()."""
        from fusesnap.fs.core.union import Union
        from fusesnap.fs.fuse.operations import Operations

        opts = opts or MountOptions()
        mountpoint = os.path.abspath(mountpoint)
        if not mountable(mountpoint):
            print(f"fusesnap: cannot mount {mountpoint}: mountpoint {mountpoint!r} does not exist "
                  "or is not a directory", file=sys.stderr)
            return 1
        try:
            tree_ = _build_tree(tree)
        except Exception as e:   # noqa: BLE001 -- as the forked daemon reports it
            raise TreeUnavailable(str(e)) from None
        try:
            union = Union(tree_, upper, work, opts)
        except (OSError, FusesnapError) as e:
            print(f"fusesnap: cannot mount {mountpoint}: {e}", file=sys.stderr)
            return 1
        return _serve_here(Operations(union), mountpoint, fuse_options(union, opts), opts.debug, lock)

    def cancel(self) -> None:
        pass

    def __enter__(self) -> "HereDaemon":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class PendingDaemon:
    """A daemon that is importing what it needs and waits to be told what to mount."""

    def __init__(self) -> None:
        spec_r, self._spec_w = os.pipe()
        self._note_r, note_w = os.pipe()
        _fork_daemon(lambda: _pending_main(spec_r, note_w), close_in_child=(self._spec_w, self._note_r))
        os.close(spec_r)
        os.close(note_w)
        self._done = False

    def start(self, tree: TreeSpec, upper: Path | str | None, work: Path | str | None,
              mountpoint: Path | str, opts: MountOptions | None = None, lock: Lock | None = None) -> int:
        """Mount like mount(..., foreground=False): 0 once the mount is live, else 1
        with the reason on stderr. Raises TreeUnavailable if the daemon could not
        build the lower tree (then nothing is mounted and the daemon is gone)."""
        import pickle

        if self._done:
            raise RuntimeError("PendingDaemon.start() called twice")
        opts = opts or MountOptions()
        mountpoint = os.path.abspath(mountpoint)
        if not mountable(mountpoint):
            self.cancel()
            print(f"fusesnap: cannot mount {mountpoint}: mountpoint {mountpoint!r} does not exist "
                  "or is not a directory", file=sys.stderr)
            return 1
        try:
            spec = pickle.dumps((tree, None if upper is None else str(upper),
                                 None if work is None else str(work), mountpoint, opts, lock))
        except BaseException:
            self.cancel()
            raise
        self._done = True
        try:
            _write_all(self._spec_w, spec)
        except BrokenPipeError:
            pass                      # the daemon died early; its note (if any) says why
        except BaseException:
            os.close(self._note_r)
            raise
        finally:
            os.close(self._spec_w)
        msg = _read_all(self._note_r)
        if msg.startswith(b"ok"):
            return 0
        if msg.startswith(_TREE_FAILED):
            raise TreeUnavailable(_reason(msg[len(_TREE_FAILED):]))
        print(f"fusesnap: cannot mount {mountpoint}: {_reason(msg)}", file=sys.stderr)
        return 1

    def cancel(self) -> None:
        """Let the daemon go without mounting anything (it exits on its own)."""
        if not self._done:
            self._done = True
            os.close(self._spec_w)
            os.close(self._note_r)

    def __enter__(self) -> "PendingDaemon":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _pending_main(spec_r: int, note_w: int) -> int:
    """The daemon side of PendingDaemon: import, wait for the spec, mount, serve."""
    def fail(msg: bytes) -> int:
        try:
            os.write(note_w, msg)
        except OSError:
            pass
        return 1

    # No cyclic garbage collection until the mount is live (_serve turns it back on):
    # importing trio/attrs and building the lower tree allocate enough objects to
    # trigger dozens of collections that find nothing to free.
    gc.disable()
    try:
        # Reasons go through note_w; the caller's stderr stays for libfuse's own
        # messages until the mount is live (as with mount()), stdin/stdout are let go now.
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(devnull, fd)
        os.close(devnull)
        # The expensive part, overlapped with the caller's own work.
        import pickle

        import pyfuse3  # noqa: F401
        import trio  # noqa: F401

        from fusesnap.fs.fuse import fastloop  # noqa: F401
        from fusesnap.fs.fuse.operations import Operations
        from fusesnap.fs.core.union import Union

        data = _read_all(spec_r)
        if not data:
            return 0              # cancelled: the caller found an error first
        tree_spec, upper, work, mountpoint, opts, lock = pickle.loads(data)
    except BaseException as e:   # noqa: BLE001 -- reported to the caller, not lost
        return fail(f"the filesystem daemon failed to start: {type(e).__name__}: {e}".encode())
    try:
        tree = _build_tree(tree_spec)
    except Exception as e:   # noqa: BLE001
        return fail(_TREE_FAILED + str(e).encode(errors="replace"))
    try:
        union = Union(tree, upper, work, opts)
    except (OSError, FusesnapError) as e:
        return fail(str(e).encode(errors="replace"))
    ops = Operations(union)
    return _serve(ops, mountpoint, fuse_options(union, opts), _pipe_note(note_w), opts.debug, lock)


# Lower trees a mount server keeps loaded for its workers (keep_tree): cache file path ->
# (the file's identity when loaded, the tree). Lower trees are immutable once built.
# Every process forked later maps them (shared until touched), which also counts in
# its proportional memory: not more than this many bytes of them, estimated.
_KEPT: dict[str, tuple[tuple[int, ...], Any]] = {}
KEEP_BYTES = 64 << 20
# Cache files this process loaded from disk, and kept trees it used: for a mount server
# to keep the former and to drop the least recently used first.
loaded_from_disk: list[str] = []
used_kept: list[str] = []


def _tree_bytes(tree: Any) -> int:
    """What a loaded tree holds, roughly: ~70 bytes an entry packed (fs/core/packedtree.py),
    ~700 as objects."""
    from fusesnap.fs.core.packedtree import PackedTree

    return len(tree) * (70 if isinstance(tree, PackedTree) else 700)


def _identity(path: str) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def keep_tree(path: str) -> bool:
    """Load the lower tree cache file at path and keep it in this process (a mount
    server), so that the processes it forks find it loaded (an unchanged file);
    keeping a tree kept already marks it recently used. True if it was loaded."""
    from fusesnap.fs.core.lowertree import LowerTree

    ident = _identity(path)
    old = _KEPT.pop(path, None)
    if old is not None and old[0] == ident:
        _KEPT[path] = old
        return False
    tree = LowerTree.load(path)
    if _tree_bytes(tree) > KEEP_BYTES:
        return False
    _KEPT[path] = (ident, tree)
    total = sum(_tree_bytes(t) for _, t in _KEPT.values())
    while total > KEEP_BYTES:
        total -= _tree_bytes(_KEPT.pop(next(iter(_KEPT)))[1])
    return True


def _build_tree(spec: TreeSpec) -> Any:
    kind = spec[0]
    if kind == "cache":
        from fusesnap.fs.core.lowertree import LowerTree

        kept = _KEPT.get(spec[1])
        if kept is not None and kept[0] == _identity(spec[1]):
            used_kept.append(spec[1])
            return kept[1]
        loaded_from_disk.append(spec[1])
        return LowerTree.load(spec[1])
    if kind == "dirs":
        if spec[2]:
            from fusesnap.fs.core.lowertree import lower_tree_from_dirs
            return lower_tree_from_dirs(spec[1])
        from fusesnap.fs.core.lazytree import LazyLowerTree
        return LazyLowerTree(spec[1])
    if kind == "empty":
        from fusesnap.fs.core.lowertree import build_lower_tree
        return build_lower_tree([])
    raise ValueError(f"unknown lower tree spec {kind!r}")


def _serve(ops: Operations, mountpoint: str, fopts: set[str], note: Callable[[bytes], None] | None,
           debug: bool, lock: Lock | None = None) -> int:
    """Mount and serve until unmounted; note(b"ok") once live, note(reason) if mounting
    failed (None: print the reason)."""
    if not _go_live(ops, mountpoint, fopts, note, debug, lock):
        return 1
    return _serve_live(ops, mountpoint, debug)


def _go_live(ops: Operations, mountpoint: str, fopts: set[str], note: Callable[[bytes], None] | None,
             debug: bool, lock: Lock | None) -> bool:
    """Mount: the kernel queues requests from here on. note(b"ok") and stdio let go
    when live; False (the reason noted or printed) when mounting failed."""
    import pyfuse3

    from fusesnap.fs.fuse import fastloop

    os.umask(0)
    if debug:
        import logging
        logging.basicConfig(level=logging.DEBUG, format="fusesnap: %(levelname)s %(message)s")

    def failed(reason: str) -> bool:
        if note is not None:
            note(reason.encode())
        else:
            print(f"fusesnap: cannot mount {mountpoint}: {reason}", file=sys.stderr)
        return False

    # kept open (inherited by nothing: close-on-exec) until the mount is gone (_serve_live)
    if lock is not None:
        fd = flock.hold(lock[0], shared=lock[1])
        if fd is None:
            return failed(lock[2])
        _held_locks.append(fd)
    conn = fuseconn.connection_fd(mountpoint)   # mounted already: libfuse serves that descriptor
    before = fastloop.fuse_fds() if conn is None else set()
    try:
        pyfuse3.init(ops, mountpoint, fopts)
    except Exception as e:
        return failed(f"{e} (options: {','.join(sorted(fopts))})")
    if note is not None:
        # Live: the mount exists and the kernel queues its requests until the loop reads
        # them. What follows only sets up how they are read (a listing of this process's
        # descriptors, the cgroup's CPU quota: ~1 ms), after the command waiting on this.
        note(b"ok")
        if not debug:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
    new = {conn} if conn is not None else fastloop.fuse_fds() - before
    if len(new) == 1 and os.environ.get("FUSESNAP_STOCK_LOOP") != "1":
        busy = ops.union.opts.busy_poll_us
        if busy is None:
            busy = fastloop.default_busy_poll_us() if _busy_poll_default is None else _busy_poll_default
        fastloop.install(new.pop(), busy_poll_us=busy)
    return True


def _serve_live(ops: Operations, mountpoint: str, debug: bool) -> int:
    """Answer requests of the mount _go_live made until it is unmounted (or a signal)."""
    import pyfuse3
    import trio

    from fusesnap.fs.fuse.readahead import DEFAULT_KB, set_read_ahead
    from fusesnap.fs.fuse.splicing import read_ahead_that_splices

    gc.enable()      # off while a pending daemon was starting up
    state = {"signalled": False}
    found: list[str | bytes | None] = []

    def where() -> str | bytes | None:
        """The mount point: a connection another process mounted is looked up in the mount
        table when first needed, not before the first request is answered."""
        if not found:
            at: str | bytes | None = mountpoint
            if fuseconn.connection_fd(mountpoint) is not None:
                at = fuseconn.mountpoint_of(ops.union.opts.fsname, "fuse.fusesnap")
            found.append(at)
        return found[0]

    async def main() -> None:
        async with trio.open_nursery() as n:
            async def watch() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                    async for _ in sigs:
                        state["signalled"] = True
                        pyfuse3.terminate()
                        return
            n.start_soon(watch)

            async def readahead() -> None:
                # after FUSE_INIT: its reply caps the readahead at what the kernel offered
                kb = ops.union.opts.read_ahead_kb
                if kb is None:
                    kb = read_ahead_that_splices(DEFAULT_KB, ops.splice_max)
                for delay in (0.05, 0.5):
                    await trio.sleep(delay)
                    try:
                        at = where()
                    except OSError:     # no mount table to read: the default readahead stays
                        return
                    if at is not None:
                        set_read_ahead(at, kb)
            n.start_soon(readahead)
            await pyfuse3.main(1, 8)
            n.cancel_scope.cancel()

    code = 0
    try:
        trio.run(main)
    except BaseException:   # keep the kernel connection from hanging
        code = 1
        if debug:
            import traceback
            traceback.print_exc()
        state["signalled"] = True
    finally:
        try:
            at = where() if state["signalled"] else None
        except OSError:
            at = None
        try:
            pyfuse3.close(unmount=state["signalled"])
        except Exception:
            pass
        if at is not None and at != mountpoint:
            try:     # libfuse knows only /dev/fd/N: the mount itself goes here
                libc.umount2(at, 2)   # MNT_DETACH
            except OSError:
                pass
        # the mount is gone: let commit and remove in at once, not when this process is
        while _held_locks:
            os.close(_held_locks.pop())
    return code
