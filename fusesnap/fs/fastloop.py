"""A cheaper wait for the next FUSE request than pyfuse3's own.

pyfuse3's session loop awaits `_wait_fuse_readable()` before every request: a
trio.Lock plus `trio.lowlevel.wait_readable` (epoll registration, a task park
and a scheduler round trip) -- most of the ~30 us a request costs in Python.
The loop looks that coroutine up in pyfuse3's module globals on every request,
so we can replace it: poll(2) the /dev/fuse fd with a 1 ms timeout first (the
next request of a busy client is usually there, or arrives within
microseconds), yield to trio every 64 requests so threads' results and signals
are still served, and fall back to pyfuse3's original wait when idle.

If a pyfuse3 release drops the hook, install() returns False and the stock
loop runs unchanged.
"""

from __future__ import annotations

import os
import select

import pyfuse3
import trio


def fuse_fds() -> set[int]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                out.add(int(name))
        except OSError:
            pass
    return out


def install(fd: int, spin_ms: int = 1) -> bool:
    orig = getattr(pyfuse3, "_wait_fuse_readable", None)
    if orig is None:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poll = poller.poll
    checkpoint = trio.lowlevel.checkpoint
    count = 0

    async def wait_fuse_readable() -> bool:
        # Invariant: return True only right after poll() saw a request, with no
        # await in between -- another worker task may have taken the request a
        # stale wakeup was about, and a blocking read would then stall the loop.
        nonlocal count
        count += 1
        if count & 63 == 0:
            await checkpoint()
        while True:
            if poll(0) or poll(spin_ms):
                return True
            if not await orig():
                return False

    pyfuse3._wait_fuse_readable = wait_fuse_readable
    return True


class DirCacheHint:
    """Ask the kernel to cache directory listings (FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE).

    pyfuse3's opendir() can only return a file handle; the `fuse_file_info` it
    replies with lives in a private `_Container` of the request. That object is
    reachable from the request coroutine's closure, which is brand new (GC
    generation 0) while our handler runs, so we find it there, check that its
    fields are the ones we expect (the O_DIRECTORY open flags and this very
    inode number at their known offsets) and set the two bits. Any mismatch
    disables the hint for the rest of the mount: listings are then simply not
    cached, as with stock pyfuse3. Lowers never change and every change of a
    directory goes through the kernel, which drops its cached listing itself.
    """

    FI = 24            # offset of `fuse_file_info fi` in _Container (after PyObject_HEAD, dev_t)
    INO = FI + 40      # `fuse_ino_t ino` follows the 40-byte fuse_file_info
    BITS = (1 << 2) | (1 << 6)   # keep_cache, cache_readdir (libfuse 3 bitfield order)

    def __init__(self) -> None:
        import ctypes
        import gc
        self.ctypes, self.gc = ctypes, gc
        self.enabled = os.environ.get("FUSESNAP_NO_DIRCACHE") != "1"
        self.scope_type: type | None = None

    def _container(self):
        gc = self.gc
        for gen in (0, 1):
            for o in gc.get_objects(gen):
                t = type(o)
                if self.scope_type is not None:
                    if t is not self.scope_type:
                        continue
                elif "opendir" not in t.__name__:
                    continue
                for r in gc.get_referents(o):
                    if type(r).__name__ == "_Container":
                        self.scope_type = t
                        return r
        return None

    def apply(self, inode: int) -> None:
        if not self.enabled:
            return
        try:
            c = self._container()
            if c is None:
                return
            ct = self.ctypes
            a = id(c)
            if ct.c_uint64.from_address(a + self.INO).value != inode or \
                    not ct.c_int.from_address(a + self.FI).value & os.O_DIRECTORY:
                self.enabled = False
                return
            w = ct.c_uint32.from_address(a + self.FI + 4)
            w.value |= self.BITS
        except Exception:
            self.enabled = False
