"""Mounting a Union with pyfuse3: foreground or daemonized once the mount is live."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pyfuse3
import trio

from fusesnap.errors import FusesnapError
from fusesnap.fs import fastloop
from fusesnap.fs.lowertree import LowerTree
from fusesnap.fs.operations import Operations
from fusesnap.fs.options import MountOptions
from fusesnap.fs.union import Union


def fuse_options(union: Union, opts: MountOptions) -> set[str]:
    o = {f"fsname={opts.fsname}", "subtype=fusesnap"}
    root = os.geteuid() == 0
    if opts.default_permissions if opts.default_permissions is not None else root:
        o.add("default_permissions")
    allow_other = opts.allow_other if opts.allow_other is not None else os.geteuid() == 0
    if allow_other:
        o.add("allow_other")
    if union.readonly:
        o.add("ro")
    if not opts.keep_atime and "atime" not in opts.fuse_options:
        # as fuse-overlayfs: reads through the mount would otherwise invalidate every
        # file's cached attributes (atime) and cost a GETATTR per stat afterwards
        o.add("noatime")
    if root:   # like a kernel overlay mount: setuid binaries and device nodes work
        for flag in ("suid", "dev"):
            if "no" + flag not in opts.fuse_options:
                o.add(flag)
    o.update(opts.fuse_options)
    return o


def mount(tree: LowerTree, upper: Path | str | None, work: Path | str | None,
          mountpoint: Path | str, opts: MountOptions | None = None, foreground: bool = False) -> int:
    """Mount; return 0 once the mount is live (the daemon keeps serving), else 1.

    With foreground=True, serve in this process until unmounted and return then."""
    opts = opts or MountOptions()
    mountpoint = os.path.abspath(mountpoint)
    try:
        if not os.path.isdir(mountpoint):
            raise FusesnapError(f"mountpoint {mountpoint!r} does not exist or is not a directory")
        union = Union(tree, upper, work, opts)
    except (OSError, FusesnapError) as e:
        print(f"fusesnap: cannot mount {mountpoint}: {e}", file=sys.stderr)
        return 1
    ops = Operations(union)
    fopts = fuse_options(union, opts)
    if foreground:
        return _serve(ops, mountpoint, fopts, None, opts.debug)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        # double fork: the daemon is reparented to init, so long-lived callers
        # (the snapshotter, tests) collect no zombies
        code = 1
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                code = _serve(ops, mountpoint, fopts, w, opts.debug)
            else:
                code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    chunks = []
    while True:
        b = os.read(r, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    msg = b"".join(chunks)
    if msg.startswith(b"ok"):
        return 0
    reason = msg.decode(errors="replace").strip() or "the filesystem daemon exited before the mount was live"
    print(f"fusesnap: cannot mount {mountpoint}: {reason}", file=sys.stderr)
    return 1


def _raise_readahead(mountpoint: str, kb: int = 1024) -> None:
    """Let the kernel read ahead 1 MiB per request instead of 128 KiB (root only).

    FUSE reads are bounded by the mount's bdi readahead; bigger requests mean
    8x fewer round trips for sequential reads. Read from mountinfo: a stat of
    the mountpoint would wait for the loop that is not running yet."""
    if os.geteuid() != 0:
        return
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                mp = parts[4].encode().decode("unicode_escape")
                if mp == mountpoint:
                    dev = parts[2]
            with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as g:
                g.write(str(kb))
    except (OSError, UnboundLocalError, IndexError):
        pass


def _serve(ops: Operations, mountpoint: str, fopts: set[str], notify_fd: int | None, debug: bool) -> int:
    os.umask(0)
    if debug:
        import logging
        logging.basicConfig(level=logging.DEBUG, format="fusesnap: %(levelname)s %(message)s")
    before = fastloop.fuse_fds()
    try:
        pyfuse3.init(ops, mountpoint, fopts)
    except Exception as e:
        reason = f"{e} (options: {','.join(sorted(fopts))})"
        if notify_fd is not None:
            os.write(notify_fd, reason.encode())
            os.close(notify_fd)
        else:
            print(f"fusesnap: cannot mount {mountpoint}: {reason}", file=sys.stderr)
        return 1
    new = fastloop.fuse_fds() - before
    if len(new) == 1 and os.environ.get("FUSESNAP_STOCK_LOOP") != "1":
        fastloop.install(new.pop())
    if notify_fd is not None:
        os.write(notify_fd, b"ok")
        os.close(notify_fd)
        if not debug:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            os.close(devnull)
    state = {"signalled": False}

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
                for delay in (0.05, 0.5):
                    await trio.sleep(delay)
                    _raise_readahead(mountpoint)
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
            pyfuse3.close(unmount=state["signalled"])
        except Exception:
            pass
    return code
