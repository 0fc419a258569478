"""Extracting tar members into a layer's staging fs/ directory, safely and without privilege.

Every path is resolved component by component from a directory fd with
O_NOFOLLOW|O_DIRECTORY, so nothing is ever written outside fs/. Decisions per hostile case:

- absolute names (`/etc/passwd`): CONTAINED - the leading '/' is dropped, as GNU tar does.
- `..` anywhere in a name: REFUSED - the import fails naming the member.
- a name through an earlier member that is a symlink or a file (`link/passwd` after
  `link -> /etc`): REFUSED - "passes through a non-directory".
- symlinks with absolute or escaping targets: CONTAINED - created as symlinks inside
  fs/ (the store never follows them) and recorded verbatim.
- hard links whose target is absolute: the target is normalized like a name; targets with
  `..`, targets that are not an earlier non-directory member of this layer, and
  self-links: REFUSED.
- a member replacing an earlier directory with a non-directory: REFUSED.
- a later member replacing an earlier file: the earlier payload moves to shadow/ so
  that export can still reproduce it; the fs/ tree shows the last one, as tar would.
- NUL bytes in names or link targets (possible via PAX): REFUSED.
- paths longer than 4000 bytes, deeper than 512 levels or with a component over 255
  bytes (no real tree has them; the host cannot hold them): REFUSED.
- symlinks with an empty or >= 4096-byte target (Linux cannot create them): recorded
  in the index only, nothing on the host.

Never applied to host files: owners, setuid/setgid/sticky bits, device nodes, fifos,
xattrs. Host modes are never wider than the tar's: files get owner read/write (plus the
tar's owner execute bit) and at most the tar's group/other read/execute bits, directories
owner rwx plus the same; parents the tar does not list are owner-only. So the owner
can always read and remove them, and nobody else gets more than the layer presents. All of it is recorded in the index and presented by the
filesystem instead. Sparse files keep their holes (seek past them, then ftruncate).
"""

from __future__ import annotations

import base64
import errno
import os
import stat
from pathlib import Path
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import InvalidInput
from ..tarsplit import header
from ..tarsplit.crc64 import crc64_update
from ..tarsplit.member import Member
from ..tarsplit.stream import ByteStream
from . import entriesfile
from .layout import host_dir_mode, host_file_mode

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_OPEN_DIRS = 256

SKIPPED = {header.GNU_VOLHDR, header.GNU_MULTIVOL}


MAX_PATH = 4000  # no real filesystem tree has longer paths (PATH_MAX is 4096)
MAX_DEPTH = 512
NAME_MAX = 255


def show(name: bytes) -> str:
    """A member name for a one-line error message (hostile names can be megabytes)."""
    r = repr(name)
    return r if len(r) <= 120 else r[:100] + "..." + r[-17:]


def normalize(name: bytes, what: bytes | None = None) -> bytes:
    """Layer-relative path: no leading '/', './', trailing '/', '.' or empty components."""
    n = name[2:] if name[:2] == b"./" else name
    # fast path for the usual "./usr/lib/x" or "usr/lib/x": nothing to fix, nothing to refuse
    if (0 < len(n) <= NAME_MAX and n[0] not in b"./" and n[-1] != 0x2F
            and b"//" not in n and b"/." not in n and b"\0" not in n):
        return n
    if b"\0" in name:
        raise InvalidInput(f"refusing member {show(what or name)}: NUL byte in path")
    parts = [p for p in name.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise InvalidInput(f"refusing member {show(what or name)}: '..' in path {show(name)}")
    out = b"/".join(parts)
    if any(len(p) > NAME_MAX for p in parts):
        raise InvalidInput(f"refusing member {show(what or name)}: a path component is longer than {NAME_MAX} bytes")
    if len(out) > MAX_PATH or len(parts) > MAX_DEPTH:
        raise InvalidInput(f"refusing member {show(what or name)}: path longer than {MAX_PATH} bytes"
                           f" or deeper than {MAX_DEPTH} levels")
    return out


class MemberSink(Protocol):
    """Extractor itself, or ExtractPipeline feeding one from another thread."""

    def begin(self, m: Member) -> None: ...
    def data(self, mv: memoryview) -> None: ...
    def end(self) -> None: ...


def feed_member(sink: MemberSink, m: Member, stream: ByteStream) -> int | None:
    """Pass member m and its payload from stream to sink; returns the payload's CRC-64
    (None without payload), as the tar-split index records it."""
    sink.begin(m)
    crc = 0
    for mv in stream.chunks(m.size, "file data"):
        crc = crc64_update(mv, crc)
        sink.data(mv)
    sink.end()
    return crc if m.size else None


class Extractor:
    """Creates one layer's files under `layer_dir/fs` and streams its entries records to a spool.

    Memory does not grow with the member count beyond a bit per member: what is at a
    path is asked of the filesystem (every regular file at a path is the payload of the
    last record owning that path), only members recorded without a host object
    (devices, fifos, symlinks Linux cannot hold) are remembered by path."""

    def __init__(self, layer_dir: Path, donor: Callable[[bytes], str | None] | None = None) -> None:
        self.layer_dir = layer_dir
        self.donor = donor
        self.fs = layer_dir / "fs"
        os.mkdir(self.fs, 0o700)
        self.root_fd = os.open(self.fs, _DIR_FLAGS)
        self._fds: dict[bytes, int] = {}
        self._shadow_fd: int | None = None
        self.spool = entriesfile.EntriesSpool(layer_dir / "entries.spool")
        self.recorded_only: set[bytes] = set()  # paths whose member has no host object
        self.displaced: dict[bytes, list[str]] = {}  # path -> where its earlier payloads went, in order
        self._moved = 0
        self.diff_size = 0
        self._names: dict[bytes, str] = {}
        self._member: Member | None = None
        self._fd = -1  # payload sink of the current member
        self._extents: list[list[int]] | None = None  # sparse extents still to fill, last first

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for fd in (self.root_fd, self._shadow_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.root_fd = -1
        self._shadow_fd = None
        self.spool.close()

    def finish(self, entries: Path) -> int:
        """Write the entries file; returns the number of members."""
        return self.spool.finish(entries, self.displaced)

    # -- path resolution -------------------------------------------------------------------
    def _dirfd(self, path: bytes, member: bytes) -> int:
        """fd of directory `path` inside fs/, creating missing parents; never follows a symlink."""
        if not path:
            return self.root_fd
        fd = self._fds.get(path)
        if fd is not None:
            return fd
        parts = path.split(b"/")
        # longest already-open prefix, then walk down one component at a time (no recursion:
        # hostile tars can nest thousands of levels deep)
        i = len(parts) - 1
        fd = self.root_fd
        while i > 0:
            cached = self._fds.get(b"/".join(parts[:i]))
            if cached is not None:
                fd = cached
                break
            i -= 1
        for j in range(i, len(parts)):
            base = parts[j]
            sub = b"/".join(parts[: j + 1])
            try:
                nfd = os.open(base, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(base, 0o700, dir_fd=fd)  # parent the tar did not list: owner-only
                nfd = os.open(base, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise InvalidInput(
                        f"refusing member {show(member)}: {show(sub)} is a symlink or file, not a directory") from None
                raise
            self._fds[sub] = nfd
            fd = nfd
        return fd

    def _shadow(self) -> int:
        if self._shadow_fd is None:
            d = self.layer_dir / "shadow"
            os.mkdir(d, 0o700)
            self._shadow_fd = os.open(d, _DIR_FLAGS)
        return self._shadow_fd

    def _lstat(self, pfd: int, base: bytes) -> os.stat_result | None:
        try:
            return os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _displace(self, path: bytes, pfd: int, base: bytes, member: bytes) -> None:
        """Make room for a member that replaces an earlier one at the same path."""
        self.recorded_only.discard(path)
        st = self._lstat(pfd, base)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            raise InvalidInput(f"refusing member {show(member)}: it replaces an earlier directory")
        if stat.S_ISREG(st.st_mode):  # the payload of the last record owning this path: keep it
            moved = self.displaced.setdefault(path, [])
            self._moved += 1
            name = f"d{self._moved}"
            os.rename(base, name, src_dir_fd=pfd, dst_dir_fd=self._shadow())
            moved.append("../shadow/" + name)
        else:
            os.unlink(base, dir_fd=pfd)

    # -- members ------------------------------------------------------------------------------
    def begin(self, m: Member) -> None:
        """Create member `m` on the host (or record it only); its payload follows via data()/end()."""
        if len(self._fds) > MAX_OPEN_DIRS:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        self._member = m
        self._fd = -1
        self._extents = None
        idx = self.spool.count
        t = m.typeflag
        path = normalize(m.name)
        kind = header.KIND_OF_TYPEFLAG.get(t, "reg")
        if kind == "reg" and m.name.endswith(b"/") and t in (header.REG, header.AREG) and not m.size:
            kind = "dir"  # V7/old tars mark directories only by the trailing slash
        if t in SKIPPED or not path:
            kind = None
        linkname = m.linkname
        if kind == "hard":
            linkname = normalize(m.linkname, m.name)
        elif b"\0" in linkname:
            raise InvalidInput(f"refusing member {show(m.name)}: NUL byte in link target")
        rec: list[Any] = [
            entriesfile.s(path), kind, m.mode, m.uid, m.gid, m.mtime_ns, m.realsize if kind == "reg" else 0,
            entriesfile.s(linkname), m.devmajor, m.devminor,
            {entriesfile.s(k): base64.b64encode(v).decode("ascii") for k, v in m.xattrs.items()} if m.xattrs else None,
            None, [list(p) for p in m.sparse] if m.sparse is not None else None,
            self._name(m.uname), self._name(m.gname), t.decode("latin-1"),
        ]
        self.diff_size += m.size
        owns = False
        if kind is None or (kind != "reg" and m.size):
            # payload the tree does not show (volume labels, dumpdir lists): keep it for export
            if m.size:
                self._open_payload(self._shadow(), str(idx).encode(), m, 0o600)
                rec[entriesfile.DATA] = f"../shadow/{idx}"
        if kind is not None:
            owns = self._place(m, path, kind, linkname, rec)
        self.spool.add(rec, owns)

    def _place(self, m: Member, path: bytes, kind: str, linkname: bytes, rec: list[Any]) -> bool:
        """Create the host object of a member; True when its record's data is at its own path."""
        parent, _, base = path.rpartition(b"/")
        pfd = self._dirfd(parent, m.name)
        if kind == "reg":
            mode = host_file_mode(m.mode)
            if not (self.donor is not None and m.sparse is None and self._lstat(pfd, base) is None
                    and self._take_donor(path, pfd, base, m)):
                try:
                    self._open_payload(pfd, base, m, mode)
                except FileExistsError:
                    self._displace(path, pfd, base, m.name)
                    self._open_payload(pfd, base, m, mode)
            rec[entriesfile.DATA] = rec[entriesfile.P]
            return True
        if kind == "dir":
            mode = host_dir_mode(m.mode)
            try:
                os.mkdir(base, mode, dir_fd=pfd)
            except FileExistsError:
                st = self._lstat(pfd, base)
                if st is not None and stat.S_ISDIR(st.st_mode):
                    os.chmod(base, mode, dir_fd=pfd)  # created as a parent first, or listed twice
                else:
                    self._displace(path, pfd, base, m.name)
                    os.mkdir(base, mode, dir_fd=pfd)
            return False
        if kind == "sym":
            if not linkname or len(linkname) >= 4096:
                # Linux cannot hold such a symlink: record it only, like a device
                self._displace(path, pfd, base, m.name)
                self.recorded_only.add(path)
                return False
            try:
                os.symlink(linkname, base, dir_fd=pfd)
            except FileExistsError:
                self._displace(path, pfd, base, m.name)
                os.symlink(linkname, base, dir_fd=pfd)
            return False
        if kind == "hard":
            if linkname in self.recorded_only:  # link to a device/fifo member: recorded only, like its target
                self._displace(path, pfd, base, m.name)
                self.recorded_only.add(path)
                return False
            tparent, _, tbase = linkname.rpartition(b"/")
            tst = None
            if linkname != path:
                try:
                    tst = self._lstat(self._dirfd(tparent, m.name), tbase)
                except InvalidInput:
                    tst = None
            if tst is None or stat.S_ISDIR(tst.st_mode):
                raise InvalidInput(
                    f"refusing hard link {show(m.name)} -> {show(m.linkname)}: target is not an earlier file of this layer")
            tpfd = self._dirfd(tparent, m.name)
            try:
                os.link(tbase, base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
            except FileExistsError:
                self._displace(path, pfd, base, m.name)
                os.link(tbase, base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISREG(tst.st_mode):
                rec[entriesfile.DATA] = rec[entriesfile.P]
                return True
            return False
        # chr, blk, fifo: recorded only, never created on the host
        self._displace(path, pfd, base, m.name)
        self.recorded_only.add(path)
        return False

    def _name(self, b: bytes) -> str:
        """uname/gname as str; a layer has few distinct ones, so decode each once."""
        v = self._names.get(b)
        if v is None:
            v = entriesfile.s(b)
            if len(self._names) < 4096:
                self._names[b] = v
        return v

    def _take_donor(self, path: bytes, pfd: int, base: bytes, m: Member) -> bool:
        """Rename the donor's file into place; the payload is then read (and CRC'd) but not written.

        False (nothing done) when there is no usable donor file: not a regular file, wrong
        size, a host mode other than the one the layer gives it (the donor may be a hard
        link to a file still in use: the store never changes it), or on another filesystem.
        """
        src = self.donor(path) if self.donor else None
        if not src:
            return False
        try:
            st = os.lstat(src)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != m.size or \
                stat.S_IMODE(st.st_mode) != host_file_mode(m.mode):
            return False
        try:
            os.rename(src, base, dst_dir_fd=pfd)
        except OSError:
            return False
        return True

    def _open_payload(self, dfd: int, base: bytes, m: Member, mode: int) -> None:
        self._fd = os.open(base, _NEW_FILE, mode, dir_fd=dfd)
        if m.sparse is not None:
            self._extents = [list(e) for e in m.sparse if e[1]]
            self._extents.reverse()

    def _too_big(self, e: OSError) -> InvalidInput:
        m = self._member
        name = show(m.name) if m is not None else "?"
        size = m.realsize if m is not None else 0
        return InvalidInput(f"member {name}: {size} bytes is more than this filesystem can hold in one file"
                            f" ({e.strerror})")

    def data(self, mv: memoryview | bytes) -> None:
        """Payload bytes of the current member, in archive order."""
        fd = self._fd
        if fd < 0:
            return  # recorded-only member, or a donated file
        ext = self._extents
        try:
            if ext is None:
                while mv:
                    mv = mv[os.write(fd, mv):]
                return
            while mv:  # sparse: the packed data fills the extents one after the other
                cur = ext[-1]
                take = min(len(mv), cur[1])
                n = os.pwrite(fd, mv[:take], cur[0])
                cur[0] += n
                cur[1] -= n
                if not cur[1]:
                    ext.pop()
                mv = mv[n:]
        except OSError as e:
            if e.errno in (errno.EFBIG, errno.EINVAL):
                raise self._too_big(e) from None
            raise

    def end(self) -> None:
        fd = self._fd
        if fd < 0:
            return
        self._fd = -1
        m = self._member
        try:
            if self._extents is not None:
                try:
                    os.ftruncate(fd, m.realsize)
                except OSError as e:
                    if e.errno in (errno.EFBIG, errno.EINVAL):
                        raise self._too_big(e) from None
                    raise
            try:
                os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
            except (OSError, OverflowError, ValueError):
                pass
        finally:
            os.close(fd)
