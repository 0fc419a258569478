"""containerd's snapshot model over the layer store: prepare / view / commit / remove / stat / walk.

Committed snapshots are store layers. `commit` turns an upper into an OCI
changeset, imports it (moving the upper's files into the layer) and records
the given name; every layer the store holds is also a committed snapshot
named by its own chainID, so imported images can be parents directly.
Active snapshots own `snapshots/<id>/{upper,work}`; views own nothing.

Store references keep parents alive: each active/view holds a reference on
its parent layer, each committed name one on its layer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable

from ..digest import is_digest
from ..errors import AlreadyExists, InUse, InvalidInput, NotFound
from . import changeset
from .filters import info_adaptor, match_any, parse_filters
from .metadata import Kind, Record, SnapshotDB, format_ns, now_ns, parse_rfc3339_ns

if TYPE_CHECKING:
    from ..store.layerstore import LayerInfo, LayerStore
    from .treecache import TreeCache

DB_NAME = "snapshots.db"


@dataclass
class Info:
    """containerd's snapshots.Info, plus the chainID of committed snapshots."""

    name: str
    kind: Kind
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created: int = 0  # ns since the epoch
    updated: int = 0
    chain_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "parent": self.parent,
            "labels": dict(self.labels),
            "created": format_ns(self.created),
            "updated": format_ns(self.updated),
        }
        if self.kind == "committed":
            d["chain_id"] = self.chain_id
        return d


@dataclass
class Usage:
    size: int  # bytes on disk
    inodes: int


@dataclass
class Mount:
    """What a client mounts (containerd's mount.Mount); see mounting.mount_all."""

    type: str
    source: str
    options: list[str]
    target: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "source": self.source, "target": self.target, "options": list(self.options)}


def _new_holder() -> str:
    """A store reference holder unique to one snapshot record (safe against concurrent same-name calls)."""
    return f"snapshot:{uuid.uuid4().hex}"


def _check_key(key: str, what: str = "key") -> None:
    if not isinstance(key, str) or not key or "\0" in key or key != key.strip():
        raise InvalidInput(f"invalid snapshot {what} {key!r}: must be a non-empty string without NUL or edge spaces")


def disk_usage(path: Path) -> Usage:
    """Bytes allocated and inodes used below path (hard links counted once), like containerd's fs.DiskUsage."""
    seen: set[tuple[int, int]] = set()
    size = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except FileNotFoundError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            size += st.st_blocks * 512
    return Usage(size, len(seen))


class Snapshotter:
    """The Python API behind `fusesnap prepare/view/commit/...` (one instance per store root)."""

    def __init__(self, root: Path | str, store: "LayerStore | None" = None) -> None:
        from ..store.layerstore import LayerStore

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._own_store = store is None
        self.store: LayerStore = store if store is not None else LayerStore(self.root)
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(exist_ok=True)
        self.trash_dir = self.snapshots_dir / ".trash"
        self.trash_dir.mkdir(exist_ok=True)
        self.db = SnapshotDB(self.root / DB_NAME)
        self._trees: TreeCache | None = None
        self._closed = False

    # -- plumbing ------------------------------------------------------------------------
    @property
    def trees(self) -> "TreeCache":
        if self._trees is None:
            from .treecache import TreeCache

            self._trees = TreeCache(self.root / "cache" / "lowertrees", self.store)
        return self._trees

    def close(self) -> None:
        """Release the database and store handles; closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        self.db.close()
        if self._own_store:
            self.store.close()

    def __enter__(self) -> "Snapshotter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def snapshot_dir(self, sid: int) -> Path:
        return self.snapshots_dir / str(sid)

    def upper_dir(self, key: str) -> Path:
        rec = self._record(key)
        if rec.kind != "active":
            raise InvalidInput(f"snapshot {key!r} is {rec.kind}, only active snapshots have an upper")
        return self.snapshot_dir(rec.id) / "upper"

    def work_dir(self, key: str) -> Path:
        return self.upper_dir(key).parent / "work"

    def _record(self, key: str) -> Record:
        rec = self.db.get(key)
        if rec is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return rec

    def _layer(self, chain_id: str) -> "LayerInfo | None":
        try:
            return self.store.get(chain_id)
        except NotFound:
            return None

    def _info_of_record(self, rec: Record) -> Info:
        return Info(rec.name, rec.kind, rec.parent, dict(rec.labels), rec.created_ns, rec.updated_ns, rec.chain_id)

    def _info_of_layer(self, li: "LayerInfo") -> Info:
        created = parse_rfc3339_ns(li.created)
        updated = self.db.layer_updated(li.chain_id) or created
        return Info(li.chain_id, "committed", li.parent or "", dict(li.labels), created, updated, li.chain_id)

    def _taken(self, name: str) -> bool:
        return self.db.get(name) is not None or (is_digest(name) and self._layer(name) is not None)

    def _trash(self, path: Path) -> None:
        if not path.exists():
            return
        dst = self.trash_dir / f"{path.name}-{uuid.uuid4().hex}"
        os.rename(path, dst)
        _rmtree(dst)

    # -- lifecycle -----------------------------------------------------------------------
    def stat(self, key: str) -> Info:
        rec = self.db.get(key)
        if rec is not None:
            return self._info_of_record(rec)
        if is_digest(key):
            li = self._layer(key)
            if li is not None:
                return self._info_of_layer(li)
        raise NotFound(f"snapshot {key!r} does not exist")

    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        """A new active (writable) snapshot on top of committed `parent` ('' for an empty base)."""
        return self._create("active", key, parent, labels)

    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        """A new read-only view of committed `parent`."""
        return self._create("view", key, parent, labels)

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str] | None) -> list[Mount]:
        _check_key(key)
        parent = parent or ""
        parent_chain: str | None = None
        if parent:
            pinfo = self.stat(parent) if self._taken(parent) else None
            if pinfo is None:
                # A layer reference the store understands (its name label, a unique hex prefix):
                # the parent is then that layer's own snapshot, named by its chainID.
                try:
                    parent = self.store.get(parent).chain_id
                except (NotFound, InvalidInput):
                    raise NotFound(f"parent snapshot {parent!r} does not exist") from None
                pinfo = self.stat(parent)
            if pinfo.kind != "committed":
                raise InvalidInput(f"parent snapshot {parent!r} is {pinfo.kind}, not committed")
            parent_chain = pinfo.chain_id
        if self._taken(key):
            raise AlreadyExists(f"snapshot {key!r} already exists")
        holder = _new_holder()
        if parent_chain:
            self.store.add_ref(parent_chain, holder)
        try:
            with self.db.tx() as c:
                if self.db.get(key) is not None:
                    raise AlreadyExists(f"snapshot {key!r} already exists")
                sid = SnapshotDB.insert(c, key, kind, parent, parent_chain, None, holder, dict(labels or {}),
                                        now_ns())
                if kind == "active":
                    d = self.snapshot_dir(sid)
                    if d.exists():  # leftover of a crash: never reuse its contents
                        self._trash(d)
                    d.mkdir(mode=0o700)
                    for sub in ("upper", "work"):
                        (d / sub).mkdir()
                        os.chmod(d / sub, 0o755)
        except BaseException:
            if parent_chain:
                self.store.drop_ref(parent_chain, holder)
            raise
        return self.mounts(key)

    def mounts(self, key: str) -> list[Mount]:
        """The mount a client performs for snapshot `key` (see mounting.mount_all)."""
        info = self.stat(key)
        if info.kind == "committed":
            raise InvalidInput(f"snapshot {key!r} is committed: create a view or an active snapshot to mount it")
        rec = self._record(key)
        from .mounting import container_options

        opts = ["rw" if info.kind == "active" else "ro", *container_options(), f"root={self.root}",
                f"snapshot={key}"]
        if info.kind == "active":
            d = self.snapshot_dir(rec.id)
            opts += [f"upperdir={d / 'upper'}", f"workdir={d / 'work'}"]
        if rec.parent_chain:
            opts.append(f"chain={rec.parent_chain}")
        return [Mount(type="fuse3.fusesnap", source="fusesnap", options=opts)]

    def changeset(self, key: str) -> changeset.UpperChangeset:
        return changeset.scan_upper(self.upper_dir(key))

    def diff(self, key: str, dst: BinaryIO) -> str:
        """Write the OCI changeset of active `key` to dst (what commit would store); return its diffID."""
        h = hashlib.sha256()
        cs = self.changeset(key)
        try:
            for chunk in cs.chunks():
                h.update(chunk)
                dst.write(chunk)
        finally:
            cs.restore()
        return "sha256:" + h.hexdigest()

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> Info:
        """Store the changes of active `key` as a layer named `name`; the active snapshot goes away."""
        _check_key(name, "name")
        rec = self._record(key)
        if rec.kind != "active":
            raise InvalidInput(f"snapshot {key!r} is {rec.kind}: only active snapshots can be committed")
        if self.db.get(name) is not None:
            raise AlreadyExists(f"snapshot {name!r} already exists")
        from .mounting import not_mounted

        with not_mounted(self, rec.id, key, "commit"):   # and no daemon starts on the upper meanwhile
            cs = changeset.scan_upper(self.snapshot_dir(rec.id) / "upper")
            try:
                li = self._import_changeset(cs, rec, name)
            finally:
                cs.restore()
            holder = _new_holder()
            self.store.add_ref(li.chain_id, holder)
            try:
                with self.db.tx() as c:
                    if self.db.get(name) is not None:
                        raise AlreadyExists(f"snapshot {name!r} already exists")
                    SnapshotDB.insert(c, name, "committed", rec.parent, rec.parent_chain, li.chain_id, holder,
                                      dict(labels or {}), now_ns())
                    SnapshotDB.delete(c, rec.id)
            except BaseException:
                self.store.drop_ref(li.chain_id, holder)
                raise
            if rec.parent_chain:
                self.store.drop_ref(rec.parent_chain, rec.holder)
            self._trash(self.snapshot_dir(rec.id))
        self._mirror_name(li.chain_id)
        return self.stat(name)

    def _import_changeset(self, cs: changeset.UpperChangeset, rec: Record, name: str) -> "LayerInfo":
        if is_digest(name) and self._layer(name) is not None:
            # A layer of that chainID exists; fine only if these changes produce exactly it.
            from ..digest import chain_id as _chain

            if _chain(rec.parent_chain, _digest_of(cs.chunks())) != name:
                raise AlreadyExists(f"snapshot {name!r} already exists")
        named = self._layer_named(name)
        if named is not None:
            raise AlreadyExists(f"name {name!r} is already used by layer {named}")
        spool = self.snapshot_dir(rec.id) / "donate"
        _rmtree(spool)  # links left by a commit that was killed
        donor = cs.donations(spool)
        try:
            return self.store.import_tar(changeset.ChunkReader(cs.chunks()), rec.parent_chain, donor=donor)
        except BaseException:
            donor.restore()
            _rmtree(spool)
            raise

    def _layer_named(self, name: str) -> str | None:
        """The layer whose store name label (what `export NAME` resolves) is `name`, if any."""
        from ..store.layerstore import NAME_LABEL

        hexish = name[7:] if name.startswith("sha256:") else name
        if not all(c in "0123456789abcdef" for c in hexish):
            # not digest-like: the store resolves such a reference by its name label alone
            try:
                li = self.store.get(name)
            except (NotFound, InvalidInput):
                return None
            return li.chain_id if li.labels.get(NAME_LABEL) == name else None
        for li in self.store.list():
            if li.labels.get(NAME_LABEL) == name:
                return li.chain_id
        return None

    def _mirror_name(self, chain_id: str, dropped: str | None = None) -> None:
        """Keep the layer's store name label on one of its committed names, so export accepts it."""
        from ..store.layerstore import NAME_LABEL

        li = self._layer(chain_id)
        if li is None:
            return
        names = self.db.names_for_chain(chain_id)
        cur = li.labels.get(NAME_LABEL)
        if cur is not None and cur != dropped:
            return  # one of our names, or a name given at import time: keep it
        want = names[0] if names else ""
        if want == (cur or ""):
            return
        try:
            self.store.set_labels(chain_id, {NAME_LABEL: want})
        except AlreadyExists:
            pass

    def remove(self, key: str) -> None:
        """Remove a snapshot; refused while another snapshot or layer builds on it."""
        rec = self.db.get(key)
        if rec is None:
            self._remove_layer_snapshot(key)
            return
        children = self.db.children(key)
        if children:
            raise InUse(f"cannot remove snapshot {key!r}: snapshot {children[0]!r} is based on it")
        if rec.kind == "committed":
            with self.db.tx() as c:
                SnapshotDB.delete(c, rec.id)
            assert rec.chain_id
            self.store.drop_ref(rec.chain_id, rec.holder)
            self._mirror_name(rec.chain_id, dropped=key)
            self._maybe_remove_layer(rec.chain_id)
            return
        from .mounting import not_mounted

        with not_mounted(self, rec.id, key, "remove"):   # and no daemon starts meanwhile
            with self.db.tx() as c:
                SnapshotDB.delete(c, rec.id)
            if rec.parent_chain:
                self.store.drop_ref(rec.parent_chain, rec.holder)
            if rec.kind == "active":
                self._trash(self.snapshot_dir(rec.id))

    def _maybe_remove_layer(self, chain_id: str) -> None:
        """Drop a committed layer once no name, snapshot or child layer refers to it any more."""
        if self.db.names_for_chain(chain_id):
            return
        li = self._layer(chain_id)
        if li is None or li.refcount > 0:
            return
        try:
            self.store.remove(chain_id)
        except (InUse, NotFound):
            return
        with self.db.tx() as c:
            SnapshotDB.forget_layer(c, chain_id)

    def _remove_layer_snapshot(self, chain_id: str) -> None:
        if not is_digest(chain_id) or self._layer(chain_id) is None:
            raise NotFound(f"snapshot {chain_id!r} does not exist")
        children = self.db.children(chain_id)
        if children:
            raise InUse(f"cannot remove snapshot {chain_id!r}: snapshot {children[0]!r} is based on it")
        names = self.db.names_for_chain(chain_id)
        if names:
            raise InUse(f"cannot remove snapshot {chain_id!r}: committed snapshot {names[0]!r} is that layer")
        try:
            self.store.remove(chain_id)
        except InUse as e:
            raise InUse(f"cannot remove snapshot {chain_id!r}: {e}") from None
        with self.db.tx() as c:
            SnapshotDB.forget_layer(c, chain_id)

    # -- mounting ------------------------------------------------------------------------
    def mount(self, key: str, mountpoint: str | os.PathLike, *, foreground: bool = False,
              options: Iterable[str] = ()) -> int:
        """Mount active `key` (rw) or view `key` (ro); returns once the mount is live."""
        from .mounting import mount_snapshot

        return mount_snapshot(self, key, mountpoint, foreground=foreground, options=options)

    def umount(self, mountpoint: str | os.PathLike, timeout: float = 30.0) -> None:
        from .mounting import umount

        umount(mountpoint, timeout)

    # -- queries -------------------------------------------------------------------------
    def list(self, *filters: str) -> list[Info]:
        """All snapshots matching any of the containerd filters (comma = AND inside one)."""
        parsed = parse_filters(filters)
        infos = [self._info_of_record(r) for r in self.db.all()]
        explicit = {i.name for i in infos}
        for li in self.store.list():
            if li.chain_id not in explicit:
                infos.append(self._info_of_layer(li))
        out = []
        for i in infos:
            adapt = info_adaptor({"name": i.name, "kind": i.kind, "parent": i.parent}, i.labels)
            if match_any(parsed, adapt):
                out.append(i)
        return out

    def walk(self, fn: Callable[[Info], None], *filters: str) -> None:
        """Call fn for each matching snapshot; fn may call back into the snapshotter."""
        for info in self.list(*filters):
            fn(info)

    def update(self, info: Info, *fieldpaths: str) -> Info:
        """Change labels (containerd field paths: none = all labels, 'labels', 'labels.KEY')."""
        cur = self.stat(info.name)
        labels = dict(cur.labels)
        if not fieldpaths:
            labels = dict(info.labels)
        for fp in fieldpaths:
            if fp == "labels":
                labels = dict(info.labels)
            elif fp.startswith("labels."):
                k = fp[len("labels."):]
                if k in info.labels:
                    labels[k] = info.labels[k]
                else:
                    labels.pop(k, None)
            else:
                raise InvalidInput(f"cannot update field {fp!r} of snapshot {info.name!r}: only labels are mutable")
        ts = now_ns()
        rec = self.db.get(info.name)
        if rec is not None:
            with self.db.tx() as c:
                SnapshotDB.set_labels(c, rec.id, labels, ts)
        else:
            assert cur.chain_id
            gone = {k: "" for k in cur.labels if k not in labels}  # the store deletes "" values
            self.store.set_labels(cur.chain_id, {**labels, **gone})
            with self.db.tx() as c:
                SnapshotDB.touch_layer(c, cur.chain_id, ts)
        return self.stat(info.name)

    def usage(self, key: str) -> Usage:
        """Disk space and inodes a snapshot itself holds (its upper, or its layer's files)."""
        info = self.stat(key)
        if info.kind == "active":
            return disk_usage(self.upper_dir(key))
        if info.kind == "view":
            return Usage(0, 0)
        assert info.chain_id
        return disk_usage(self.store.fs_dir(info.chain_id))

    def chain_of(self, key: str) -> list[str]:
        """Bottom-to-top chainIDs of the layers below an active/view, or of a committed snapshot."""
        info = self.stat(key)
        top = info.chain_id if info.kind == "committed" else self._record(key).parent_chain
        return self.store.chain(top) if top else []

    def parent_chain(self, key: str) -> str | None:
        info = self.stat(key)
        if info.kind == "committed":
            return info.chain_id
        return self._record(key).parent_chain

    def cleanup(self) -> list[str]:
        """Delete what no snapshot references: orphaned snapshot dirs, trash, stale tree caches."""
        removed: list[str] = []
        with self.db.tx():  # holds off concurrent prepares while their dirs are judged
            ids = {str(r.id) for r in self.db.all() if r.kind == "active"}
            for d in sorted(self.snapshots_dir.iterdir()):
                if d.name not in ids and d != self.trash_dir:
                    dst = self.trash_dir / f"{d.name}-{uuid.uuid4().hex}"
                    os.rename(d, dst)
                    removed.append(str(d))
        for d in sorted(self.trash_dir.iterdir()):
            _rmtree(d)
            removed.append(str(d))
        live = {li.chain_id for li in self.store.list()}
        removed += self.trees.prune(live)
        return removed


def _digest_of(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return "sha256:" + h.hexdigest()


def _rmtree(path: Path) -> None:
    """Delete a tree that may hold 0o000 dirs and files (chmod applied for real by a rootless daemon).

    Best effort: what cannot be deleted stays in the trash for the next `cleanup`.
    """
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir() or path.is_symlink():
        path.unlink(missing_ok=True)
        return
    try:
        shutil.rmtree(path)
        return
    except OSError:
        pass
    stack = [str(path)]
    while stack:  # give the owner access back everywhere, then retry
        d = stack.pop()
        try:
            os.chmod(d, stat.S_IRWXU)
            with os.scandir(d) as it:
                stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
        except OSError:
            continue
    shutil.rmtree(path, ignore_errors=True)
