"""Deterministic OCI changeset tars: what `commit` stores and `diff` prints.

The same upper always gives the same bytes: members sorted by path (a
directory before its contents, names compared as bytes), PAX headers only
where USTAR cannot hold a value, empty user/group names, whole-second mtimes
taken from the files, and a plain two-block end of archive (no record padding).

Whiteouts come out as empty regular files `.wh.NAME` and opaque directories
as a `.wh..wh..opq` member right after the directory; both carry mode 0,
owner 0:0 and the mtime of the directory holding them, so nothing in the tar
depends on when the deletion happened. Hard links inside the upper become tar
links to the first path (in tar order) of the same inode.
"""

from __future__ import annotations

import dataclasses
import io
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from ..errors import InvalidInput
from ..layerentry import LayerEntry, kind_of_mode
from ..store.layout import host_file_mode
from ..tarsplit.header import TYPEFLAG_OF_KIND
from ..tarsplit.member import Member
from . import upperview
from .idmap import IdTranslation

BLOCK = 512
WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
CHUNK = 1 << 20



def member(path: bytes, kind: str, mode: int, uid: int = 0, gid: int = 0, mtime: int = 0,
           **fields: object) -> Member:
    """A member to write: file type by kind, mtime in whole seconds (as the changeset stores it)."""
    return Member(name=path, typeflag=TYPEFLAG_OF_KIND[kind], mode=mode, uid=uid, gid=gid,
                  mtime_ns=mtime * 1_000_000_000, **fields)  # type: ignore[arg-type]


def mtime_s(m: Member) -> int:
    return m.mtime_ns // 1_000_000_000


def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def encode_header(m: Member) -> bytes:
    """The header block(s) of one member, PAX where needed, fixed everywhere else."""
    ti = tarfile.TarInfo(_s(m.name))
    ti.type = m.typeflag
    ti.mode = m.mode & 0o7777
    ti.uid, ti.gid = m.uid, m.gid
    ti.uname = ti.gname = ""
    ti.mtime = mtime_s(m)
    ti.size = m.size if m.kind == "reg" else 0
    ti.linkname = _s(m.linkname)
    ti.devmajor, ti.devminor = (m.devmajor, m.devminor) if m.kind in ("chr", "blk") else (0, 0)
    if m.xattrs:
        ti.pax_headers = {
            "SCHILY.xattr." + _s(k): _s(v) for k, v in sorted(m.xattrs.items())
        }
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_chunks(members: Iterable[Member]) -> Iterator[bytes]:
    """Header, content and padding of each member, then the end-of-archive blocks."""
    for m in members:
        yield encode_header(m)
        if m.kind == "reg" and m.size:
            if m.source is None:
                raise InvalidInput(f"no content for {_s(m.name)!r}")
            left = m.size
            with open(m.source, "rb") as f:
                while left:
                    chunk = f.read(min(CHUNK, left))
                    if not chunk:
                        raise InvalidInput(f"{m.source} shrank while it was being written to the tar")
                    left -= len(chunk)
                    yield chunk
            pad = -m.size % BLOCK
            if pad:
                yield b"\0" * pad
    yield b"\0" * (2 * BLOCK)


class ChunkReader(io.RawIOBase):
    """A read-only binary stream over an iterator of byte chunks (feeds import_tar lazily)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._it = chunks
        self._buf = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = len(b)
        while len(self._buf) - self._pos < n:
            try:
                nxt = next(self._it)
            except StopIteration:
                break
            self._buf = self._buf[self._pos :] + nxt
            self._pos = 0
        avail = self._buf[self._pos : self._pos + n]
        b[: len(avail)] = avail
        self._pos += len(avail)
        return len(avail)


# -- the upper dir as a changeset --------------------------------------------------------


def _sorted_names(dirpath: Path) -> list[bytes]:
    return sorted(os.listdir(os.fsencode(dirpath)))


@dataclass
class UpperChangeset:
    """The members of an upper directory, plus where each regular member's content lives."""

    upper: Path
    members: list[Member]
    sources: dict[bytes, Path]
    opened: list[tuple[Path, int]] = field(default_factory=list)
    """Entries given owner read (and search) permission to be read; restore() puts the modes back."""

    def chunks(self) -> Iterator[bytes]:
        return tar_chunks(self.members)

    def restore(self) -> None:
        for p, mode in reversed(self.opened):
            try:
                os.chmod(p, mode)
            except OSError:
                pass
        self.opened.clear()

    def donor(self, path: bytes) -> str | None:
        """Host file equal to member `path` (the store may move it instead of writing a copy)."""
        p = self.sources.get(path.rstrip(b"/"))
        return str(p) if p is not None else None

    def donations(self, spool: Path) -> "Donations":
        """A donor that hands out hard links made in `spool`, so a failed import loses nothing."""
        return Donations(self, spool)

    def write(self, dst: BinaryIO) -> None:
        for chunk in self.chunks():
            dst.write(chunk)


class Donations:
    """Donor for LayerStore.stage_tar: each upper file is offered as a fresh hard link.

    The store renames what it is given into the new layer. Giving it a link
    (same filesystem, no data copied) instead of the upper's own name keeps the
    upper whole if the commit fails or is killed: the store never changes a
    donated file (it takes only files whose host mode already is the one the
    layer gives them), and the link in the layer is deleted with the layer if
    the commit does not complete.
    """

    def __init__(self, cs: UpperChangeset, spool: Path) -> None:
        self.cs = cs
        self.spool = Path(spool)
        self.spool.mkdir(mode=0o700, exist_ok=True)
        self.given = 0
        self._modes = {m.name: m.mode for m in cs.members if m.kind == "reg"}

    def __call__(self, path: bytes) -> str | None:
        key = path.rstrip(b"/")
        src = self.cs.sources.get(key)
        if src is None:
            return None
        try:
            st = os.lstat(src)
            if stat.S_IMODE(st.st_mode) != host_file_mode(self._modes.get(key, 0)):
                return None
            link = self.spool / str(self.given)
            os.link(src, link)
        except OSError:
            return None  # the store then writes the content from the stream
        self.given += 1
        return str(link)


def _whiteout(path: bytes, mtime: int) -> Member:
    return member(path, "reg", 0, mtime=mtime)


def scan_upper(upper: Path, ids: IdTranslation | None = None) -> UpperChangeset:
    """Walk an upper dir (docs/ARCHITECTURE.md format) into sorted OCI changeset members.

    `ids` maps host owners into the user namespace the snapshot was mounted in."""
    upper = Path(upper)
    members: list[Member] = []
    sources: dict[bytes, Path] = {}
    first_link: dict[tuple[int, int], bytes] = {}
    opened: list[tuple[Path, int]] = []
    me = os.geteuid()

    def make_readable(hp: Path, st: os.stat_result, need: int) -> None:
        # Unprivileged, the daemon applies chmod 000 for real: the owner may always take it back.
        if me != 0 and st.st_uid == me and st.st_mode & need != need:
            os.chmod(hp, stat.S_IMODE(st.st_mode) | need)
            opened.append((hp, stat.S_IMODE(st.st_mode)))

    def walk(rel: bytes, host: Path, dir_mtime: int) -> None:
        names = _sorted_names(host)
        out: list[tuple[bytes, Path, os.stat_result]] = []
        for name in names:
            hp = host / os.fsdecode(name)
            st = os.lstat(hp)
            out.append((name, hp, st))
        emitted: set[bytes] = set()
        entries: list[tuple[bytes, Callable[[], None]]] = []
        for name, hp, st in out:
            member_rel = rel + name if not rel else rel + b"/" + name
            if name == OPAQUE_MARKER:
                continue  # re-emitted right after the directory entry
            target = upperview.whiteout_target(hp, name, st)
            if target is not None:
                wh_name = WHITEOUT_PREFIX + target
                wpath = wh_name if not rel else rel + b"/" + wh_name
                if wpath in emitted:
                    continue
                emitted.add(wpath)
                entries.append((wh_name, lambda wpath=wpath: members.append(_whiteout(wpath, dir_mtime))))
                continue
            if stat.S_ISSOCK(st.st_mode):
                continue  # sockets have no tar representation
            entries.append((name, lambda p=member_rel, hp=hp, st=st: emit(p, hp, st)))
        # Sort by the name that ends up in the tar so order never depends on the marker form.
        for _, fn in sorted(entries, key=lambda e: e[0]):
            fn()

    def emit(path: bytes, hp: Path, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            make_readable(hp, st, 0o500)
        elif stat.S_ISREG(st.st_mode):
            make_readable(hp, st, 0o400)
        ps = upperview.presented(hp, st, ids)
        kind = kind_of_mode(ps.mode)
        if kind not in TYPEFLAG_OF_KIND:
            return  # a socket (possibly only presented as one): tar has no such member
        mtime = int(st.st_mtime)
        xattrs = upperview.visible_xattrs(hp, kind)  # type: ignore[arg-type]
        m = member(path, kind, stat.S_IMODE(ps.mode), ps.uid, ps.gid, mtime, xattrs=xattrs)
        if kind == "dir":
            members.append(m)
            if upperview.is_opaque(hp):
                members.append(_whiteout(path + b"/" + OPAQUE_MARKER, mtime))
            walk(path, hp, mtime)
            return
        if kind == "reg":
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in first_link:
                m.typeflag = TYPEFLAG_OF_KIND["hard"]
                m.linkname = first_link[key]
                m.xattrs = {}
            else:
                if st.st_nlink > 1:
                    first_link[key] = path
                m.size = st.st_size
                m.source = hp
                sources[path] = hp
        elif kind == "sym":
            m.linkname = os.readlink(os.fsencode(hp))
        elif kind in ("chr", "blk"):
            m.devmajor, m.devminor = os.major(ps.rdev), os.minor(ps.rdev)
        members.append(m)

    root_st = os.stat(upper)
    cs = UpperChangeset(upper, members, sources, opened)
    try:
        make_readable(upper, root_st, 0o500)
        walk(b"", upper, int(root_st.st_mtime))
    except BaseException:
        cs.restore()
        raise
    return cs


# -- several committed layers squashed into one changeset (moby's TarStreamFrom) -------------


def _components(path: bytes) -> tuple[bytes, ...]:
    return tuple(path.split(b"/"))


def _under(path: bytes, keys: Iterable[bytes]) -> list[bytes]:
    prefix = path + b"/"
    return [k for k in keys if k.startswith(prefix)]


def squash_members(layers: Iterable[tuple[Iterable[LayerEntry], Path]]) -> list[Member]:
    """One changeset equal to applying `layers` (bottom to top, each (entries, fs_dir)) in order.

    Deletions are kept as whiteouts (they act on whatever lies below the first
    layer); a directory re-created after a deletion, or after a non-directory
    at the same path, becomes opaque. Hard links are regrouped so the first
    path in output order carries the content.
    """
    state: dict[bytes, tuple[Member, object]] = {}  # path -> (member, content identity)
    whiteouts: dict[bytes, Member] = {}
    opaque: dict[bytes, Member] = {}

    def drop_tree(path: bytes, including: bool) -> None:
        for k in _under(path, list(state)):
            del state[k]
        for k in _under(path, list(whiteouts)):
            del whiteouts[k]
        for k in _under(path, list(opaque)):
            del opaque[k]
        if including:
            state.pop(path, None)
            opaque.pop(path, None)

    for entries, fs_dir in layers:
        layer_paths: dict[bytes, tuple[Member, object]] = {}
        for e in entries:
            base = e.path.rsplit(b"/", 1)[-1]
            parent = e.path[: -len(base) - 1] if b"/" in e.path else b""
            mtime = e.mtime_ns // 1_000_000_000
            if base == OPAQUE_MARKER:
                if parent:
                    drop_tree(parent, including=False)
                else:  # opaque root: nothing below shows through
                    state.clear()
                    whiteouts.clear()
                    opaque.clear()
                opaque[parent] = member(e.path, "reg", e.mode, e.uid, e.gid, mtime)
                continue
            if base.startswith(WHITEOUT_PREFIX):
                target = (parent + b"/" if parent else b"") + base[len(WHITEOUT_PREFIX):]
                drop_tree(target, including=True)
                whiteouts[target] = member(e.path, "reg", e.mode, e.uid, e.gid, mtime)
                continue
            m = member(e.path, e.kind, e.mode, e.uid, e.gid, mtime,
                       size=e.size, linkname=e.linkname, devmajor=e.devmajor, devminor=e.devminor,
                       xattrs=dict(e.xattrs))
            ident: object = object()
            if e.kind == "reg":
                m.source = Path(fs_dir) / os.fsdecode(e.data) if e.data is not None else None
            elif e.kind == "hard":
                tgt = layer_paths.get(e.linkname) or state.get(e.linkname)
                if tgt is None:
                    raise InvalidInput(f"hard link {_s(e.path)!r} points to missing {_s(e.linkname)!r}")
                tm = tgt[0]
                if tm.kind != "reg":  # a link to a non-file: repeat that entry under this path
                    m = dataclasses.replace(tm, name=e.path)
                    state[e.path] = layer_paths[e.path] = (m, object())
                    continue
                m = member(e.path, "reg", tm.mode, tm.uid, tm.gid, mtime_s(tm),
                           size=tm.size, xattrs=dict(tm.xattrs), source=tm.source)
                ident = tgt[1]
            old = state.get(e.path)
            if e.path in whiteouts:
                del whiteouts[e.path]
                if m.kind == "dir":
                    opaque[e.path] = member(e.path + b"/" + OPAQUE_MARKER, "reg", 0, mtime=mtime)
            elif old is not None and old[0].kind == "dir" and m.kind != "dir":
                drop_tree(e.path, including=False)
            elif old is not None and old[0].kind != "dir" and m.kind == "dir":
                opaque[e.path] = member(e.path + b"/" + OPAQUE_MARKER, "reg", 0, mtime=mtime)
            state[e.path] = layer_paths[e.path] = (m, ident)

    keyed: list[tuple[tuple[bytes, ...], Member, object]] = []
    for path, (m, ident) in state.items():
        keyed.append((_components(path), m, ident))
    for target, m in whiteouts.items():
        comps = _components(target)
        wpath = b"/".join(comps[:-1] + (WHITEOUT_PREFIX + comps[-1],))
        keyed.append((_components(wpath), member(wpath, "reg", m.mode, m.uid, m.gid, mtime_s(m)), None))
    for d, m in opaque.items():
        if d in state or d == b"":
            keyed.append(((_components(d) if d else ()) + (b"",), member((d + b"/" if d else b"") + OPAQUE_MARKER, "reg", m.mode, m.uid, m.gid, mtime_s(m)), None))
    keyed.sort(key=lambda t: t[0])
    out: list[Member] = []
    first_of: dict[int, bytes] = {}
    for _, m, ident in keyed:
        if m.kind == "reg" and ident is not None:
            key = id(ident)
            if key in first_of:
                m = member(m.name, "hard", m.mode, m.uid, m.gid, mtime_s(m),
                           linkname=first_of[key])
            else:
                first_of[key] = m.name
        out.append(m)
    return out
