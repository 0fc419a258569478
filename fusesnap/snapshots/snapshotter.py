"""containerd's snapshot model over the layer store: prepare / view / commit / remove / stat / walk.

Committed snapshots are store layers. `commit` turns an upper into an OCI
changeset, imports it (moving the upper's files into the layer) and records
the given name; every layer the store holds is also a committed snapshot
named by its own chainID, so imported images can be parents directly.
Active snapshots own `snapshots/<id>/{upper,work}`; views own nothing.

Store references keep parents alive: each active/view holds a reference on
its parent layer, each committed name one on its layer (and is one of the
layer's store names, so `export NAME` finds it).

Snapshot records live in the store's database: a snapshot and the references it
holds change in one transaction, and a commit's new layer row, its reference,
the committed record and the removal of the active record commit together.
Directories follow intents recorded in those transactions (store/recovery.py):
a crash can leave neither a reference nobody holds, nor a layer without its
snapshot, nor an upper next to the layer its files became.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable

from ..crashpoints import crash_point
from ..digest import chain_id as compute_chain_id, is_digest
from ..errors import AlreadyExists, FusesnapError, InUse, InvalidInput, NotFound
from ..store.fsck import database_problem, set_database_aside
from ..store.layerstore import NAME_LABEL, LayerInfo, LayerStore
from ..store.layout import StoreLayout, rmtree
from ..store.recovery import FsckReport
from . import changeset
from .filters import info_adaptor, match_any, parse_filters
from .idmap import IdMap, translation_for
from .metadata import Kind, Record, SnapshotDB, format_ns, now_ns, parse_rfc3339_ns
from .mounting import container_options, mount_snapshot, not_mounted, split_mount_options, umount

if TYPE_CHECKING:
    from .treecache import TreeCache

SNAPSHOT_RECORD = "snapshot.json"  # in snapshots/<id>/: what rebuilds the record of an active snapshot
HOLDER_PREFIX = "snapshot:"
MIXED = "mixed"  # idmap of a snapshot mounted from two different user namespaces


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
    """What a client mounts (containerd's mount.Mount); see mount_all."""

    type: str
    source: str
    options: list[str]
    target: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "source": self.source, "target": self.target, "options": list(self.options)}


def _new_holder() -> str:
    """A store reference holder unique to one snapshot record (safe against concurrent same-name calls)."""
    return f"{HOLDER_PREFIX}{uuid.uuid4().hex}"


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

    def __init__(self, root: Path | str, store: LayerStore | None = None, *, finish: bool = True) -> None:
        """Open the snapshotter of a store root (`finish`: see LayerStore)."""
        self.root = Path(root)
        self._own_store = store is None
        self.store: LayerStore = store if store is not None else LayerStore(self.root, finish=finish)
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(mode=0o700, exist_ok=True)
        self.trash_dir = self.snapshots_dir / ".trash"
        self.trash_dir.mkdir(mode=0o700, exist_ok=True)
        self.db = SnapshotDB(self.store.db, self.root)
        self._trees: TreeCache | None = None
        self._closed = False

    # -- plumbing ------------------------------------------------------------------------
    @property
    def trees(self) -> "TreeCache":
        if self._trees is None:
            # imported on first use: commands that never mount skip fs.core (~10 ms of imports)
            from .treecache import TreeCache

            self._trees = TreeCache(self.root / "cache" / "lowertrees", self.store)
        return self._trees

    def close(self) -> None:
        """Release the store handle (if this snapshotter opened it); closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        if self._own_store:
            self.store.close()

    def reopen(self) -> "Snapshotter":
        """Another Snapshotter on the same root with database connections of its own (for a
        forked child: none may cross a fork)."""
        return Snapshotter(self.root)

    def __enter__(self) -> "Snapshotter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def snapshot_dir(self, sid: int) -> Path:
        return self.snapshots_dir / str(sid)

    def upper_dir(self, key: str) -> Path:
        rec = self.record(key)
        if rec.kind != "active":
            raise InvalidInput(f"snapshot {key!r} is {rec.kind}, only active snapshots have an upper")
        return self.snapshot_dir(rec.id) / "upper"

    def work_dir(self, key: str) -> Path:
        return self.upper_dir(key).parent / "work"

    def record(self, key: str) -> Record:
        """The database record of an explicit snapshot (NotFound for unnamed layer snapshots)."""
        rec = self.db.get(key)
        if rec is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return rec

    def exists(self, key: str) -> bool:
        """True when `key` names a snapshot (a record, or a stored layer's chainID)."""
        return self.db.get(key) is not None or (is_digest(key) and self.store.exists(key))

    def _layer(self, chain_id: str) -> LayerInfo | None:
        try:
            return self.store.get(chain_id)
        except NotFound:
            return None

    def _info_of_record(self, rec: Record) -> Info:
        return Info(rec.name, rec.kind, rec.parent, dict(rec.labels), rec.created_ns, rec.updated_ns, rec.chain_id)

    def _info_of_layer(self, li: LayerInfo) -> Info:
        created = parse_rfc3339_ns(li.created)
        updated = self.db.layer_updated(li.chain_id) or created
        return Info(li.chain_id, "committed", li.parent or "", dict(li.labels), created, updated, li.chain_id)

    def _give_up(self, t: Any, path: Path, why: str) -> int:
        """Record (inside a transaction) that a snapshot directory is to be deleted."""
        return self.store.db.add_intent(t, self.store.layout.relative(path), why)

    def delete_given_up(self, path: Path, intent: int) -> None:
        """Delete a directory given up in a transaction (_give_up), and its intent."""
        self.store.layout.trash(path)
        with self.store.db.tx() as t:
            self.store.db.drop_intent(t, intent)

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
        self.create("active", key, parent, labels)
        return self.mounts(key)

    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        """A new read-only view of committed `parent`."""
        self.create("view", key, parent, labels)
        return self.mounts(key)

    def create(self, kind: Kind, key: str, parent: str = "", labels: dict[str, str] | None = None) -> Info:
        """A new active snapshot or view (prepare, view without their mounts), and its Info."""
        if kind == "committed":
            raise InvalidInput("a committed snapshot is made by commit, not created")
        _check_key(key)
        holder = _new_holder()
        labels = dict(labels or {})
        ts = now_ns()
        made: Path | None = None
        try:
            # every check reads inside the transaction: one lock for all (in rollback-journal
            # mode each statement outside one takes and drops the lock and looks for a hot
            # journal), and nothing can change between a check and the insert
            with self.store.db.tx() as t:
                parent, parent_chain = self._committed_parent(parent or "")
                if self.exists(key):
                    raise AlreadyExists(f"snapshot {key!r} already exists")
                if parent_chain:
                    self.store.db.add_ref(t, parent_chain, holder, "ref")
                sid = SnapshotDB.insert(t, key, kind, parent, parent_chain, None, holder, labels, ts)
                if kind == "active":
                    d = self.snapshot_dir(sid)
                    if d.exists():  # leftover of a crash: never reuse its contents
                        self.store.layout.trash(d)
                    d.mkdir(mode=0o700)
                    made = d
                    for sub in ("upper", "work"):
                        (d / sub).mkdir()
                        os.chmod(d / sub, 0o755)
                    (d / SNAPSHOT_RECORD).write_text(json.dumps(
                        {"name": key, "kind": kind, "parent": parent, "parent_chain": parent_chain,
                         "labels": labels, "created_ns": ts}, sort_keys=True))
                crash_point("prepare-before-commit")
        except BaseException:
            if made is not None:
                rmtree(made)
            raise
        return Info(key, kind, parent, labels, ts, ts, None)

    def _committed_parent(self, parent: str) -> tuple[str, str | None]:
        """(the parent's snapshot name, its chainID) for a new snapshot on `parent` ('': none)."""
        if not parent:
            return "", None
        pinfo = self.stat(parent) if self.exists(parent) else None
        if pinfo is None:
            # A layer reference the store understands (one of its names, a unique hex prefix):
            # the parent is then that layer's own snapshot, named by its chainID.
            try:
                parent = self.store.get(parent).chain_id
            except (NotFound, InvalidInput):
                raise NotFound(f"parent snapshot {parent!r} does not exist") from None
            pinfo = self.stat(parent)
        if pinfo.kind != "committed":
            raise InvalidInput(f"parent snapshot {parent!r} is {pinfo.kind}, not committed")
        assert pinfo.chain_id
        self.store.check_present(pinfo.chain_id)
        return parent, pinfo.chain_id

    def mountable(self, key: str) -> Info:
        """The Info of `key`, an active snapshot or a view (InvalidInput for a committed one)."""
        info = self.stat(key)
        if info.kind == "committed":
            raise InvalidInput(f"snapshot {key!r} is committed: create a view or an active snapshot to mount it")
        return info

    def mounts(self, key: str, options: Iterable[str] = ()) -> list[Mount]:
        """The mount a client performs for snapshot `key` (see mount_all); options: the
        mount's own beyond a container's."""
        info = self.mountable(key)
        rec = self.record(key)
        opts = ["rw" if info.kind == "active" else "ro", *container_options(), *options, f"root={self.root}",
                f"snapshot={key}"]
        if info.kind == "active":
            d = self.snapshot_dir(rec.id)
            opts += [f"upperdir={d / 'upper'}", f"workdir={d / 'work'}"]
        if rec.parent_chain:
            opts.append(f"chain={rec.parent_chain}")
        return [Mount(type="fuse3.fusesnap", source="fusesnap", options=opts)]

    def note_mount(self, key: str) -> None:
        """Record the user namespace an active snapshot is being mounted in (what its upper's
        owners mean, for a commit run elsewhere: see idmap.py). Mounts from the initial
        namespace write nothing; the first from another records its mapping; a later one
        with a different mapping marks the snapshot as mixed (its commit is refused)."""
        rec = self.db.get(key)
        if rec is None or rec.kind != "active" or rec.idmap == MIXED:
            return
        cur = IdMap.current()
        if rec.idmap is None:
            if cur.is_initial():
                return
            value = cur.to_json()
        else:
            old = IdMap.from_json(rec.idmap)
            if old.userns == cur.userns or old.same_mapping(cur):
                return
            value = MIXED
        with self.store.db.tx() as t:
            SnapshotDB.set_idmap(t, rec.id, value)

    def changeset(self, key: str) -> changeset.UpperChangeset:
        rec = self.record(key)
        return changeset.scan_upper(self.upper_dir(key), ids=self._ids_of(rec))

    def _ids_of(self, rec: Record) -> Any:
        if rec.idmap == MIXED:
            raise InvalidInput(f"snapshot {rec.name!r} was mounted from user namespaces with different id"
                               " mappings: its upper mixes their owners, so its changes cannot be stored")
        return translation_for(rec.idmap)

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
        """Store the changes of active `key` as a layer named `name`; the active snapshot goes away.

        The upper's files become the layer's by hard link (no copy). Until the transaction
        that inserts the layer, its reference and the committed record and deletes the
        active one, nothing is visible and the upper is untouched; right after it, the
        upper is deleted (an intent in that transaction finishes the job after a crash)."""
        _check_key(name, "name")
        rec = self.record(key)
        if rec.kind != "active":
            raise InvalidInput(f"snapshot {key!r} is {rec.kind}: only active snapshots can be committed")
        if self.db.get(name) is not None:
            raise AlreadyExists(f"snapshot {name!r} already exists")
        named = self.store.db.chains_named(name)
        if named:
            raise AlreadyExists(f"name {name!r} is already used by layer {named[0]}")
        with not_mounted(self, rec.id, key, "commit"):   # and no daemon starts on the upper meanwhile
            d = self.snapshot_dir(rec.id)
            cs = changeset.scan_upper(d / "upper", ids=self._ids_of(rec))
            holder = _new_holder()
            spool = d / "donate"
            try:
                if is_digest(name) and self._layer(name) is not None:
                    # A layer of that chainID exists; fine only if these changes produce exactly it.
                    if compute_chain_id(rec.parent_chain, _digest_of(cs.chunks())) != name:
                        raise AlreadyExists(f"snapshot {name!r} already exists")
                rmtree(spool)  # links left by a commit that was killed
                donor = cs.donations(spool)
                try:
                    labels = dict(labels or {})
                    ts = now_ns()
                    note = {"snapshot": {"name": name, "parent": rec.parent, "labels": labels, "created_ns": ts}}
                    with self.store.stage_tar(changeset.ChunkReader(cs.chunks()), rec.parent_chain,
                                              donor=donor) as staged:
                        with self.store.publish(staged, labels={NAME_LABEL: name}, claim=True, note=note) as t:
                            intent = self._swap_records(t, rec, name, staged.chain_id, holder, labels, ts)
                finally:
                    rmtree(spool)
            finally:
                cs.restore()
            crash_point("commit-after-tx")
            self.delete_given_up(d, intent)
        return self.stat(name)

    def _swap_records(self, t: Any, rec: Record, name: str, chain: str, holder: str,
                      labels: dict[str, str], ts: int) -> int:
        """Inside the commit's transaction (which also gave the layer the name): the committed
        record replaces the active one."""
        if self.db.get(name) is not None:
            raise AlreadyExists(f"snapshot {name!r} already exists")
        if self.db.get_id(rec.id) is None:
            raise NotFound(f"snapshot {rec.name!r} was removed during the commit")
        sdb = self.store.db
        sdb.add_ref(t, chain, holder, "ref")
        SnapshotDB.insert(t, name, "committed", rec.parent, rec.parent_chain, chain, holder, labels, ts)
        SnapshotDB.delete(t, rec.id)
        if rec.parent_chain:
            sdb.drop_ref(t, rec.parent_chain, rec.holder, "ref")
        return self._give_up(t, self.snapshot_dir(rec.id), "commit")

    def remove(self, key: str, later: Callable[[Path, int], None] | None = None) -> None:
        """Remove a snapshot; refused while another snapshot or layer builds on it.

        later(path, intent): an active snapshot's directory is deleted by that (a
        background worker calling delete_given_up) instead of before this returns;
        the snapshot is gone either way, and the intent finishes the job after a crash."""
        rec = self.db.get(key)
        if rec is None:
            self._remove_layer_snapshot(key)
            return
        # an active snapshot's or a view's daemon must not start meanwhile
        with not_mounted(self, rec.id, key, "remove") if rec.kind != "committed" else nullcontext():
            intent = None
            with self.store.db.tx() as t:
                if self.db.get_id(rec.id) is None:
                    raise NotFound(f"snapshot {key!r} does not exist")
                children = self.db.children(key)
                if children:
                    raise InUse(f"cannot remove snapshot {key!r}: snapshot {children[0]!r} is based on it")
                SnapshotDB.delete(t, rec.id)
                held = rec.chain_id if rec.kind == "committed" else rec.parent_chain
                if held:
                    self.store.db.drop_ref(t, held, rec.holder, "ref")
                if rec.kind == "committed":
                    assert rec.chain_id
                    self.store.db.drop_name(t, rec.chain_id, key)
                elif rec.kind == "active":
                    intent = self._give_up(t, self.snapshot_dir(rec.id), "remove")
            if intent is not None:
                crash_point("remove-after-tx")
                (later or self.delete_given_up)(self.snapshot_dir(rec.id), intent)
        if rec.kind == "committed":
            assert rec.chain_id
            self._maybe_remove_layer(rec.chain_id)

    def _maybe_remove_layer(self, chain_id: str) -> None:
        """Drop a committed layer once no name, snapshot or child layer refers to it any more."""
        if self.db.names_for_chain(chain_id):
            return
        li = self._layer(chain_id)
        if li is None or li.refcount > 0 or li.names:
            return
        try:
            self.store.remove(chain_id)
        except (InUse, NotFound):
            return
        with self.store.db.tx() as t:
            SnapshotDB.forget_layer(t, chain_id)

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
        with self.store.db.tx() as t:
            SnapshotDB.forget_layer(t, chain_id)

    # -- mounting ------------------------------------------------------------------------
    def mount(self, key: str, mountpoint: str | os.PathLike, *, foreground: bool = False,
              options: Iterable[str] = ()) -> int:
        """Mount active `key` (rw) or view `key` (ro); returns once the mount is live."""
        self.note_mount(key)
        return mount_snapshot(self, key, mountpoint, foreground=foreground, options=options)

    def umount(self, mountpoint: str | os.PathLike, timeout: float = 30.0) -> None:
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
        top = info.chain_id if info.kind == "committed" else self.record(key).parent_chain
        return self.store.chain(top) if top else []

    def parent_chain(self, key: str) -> str | None:
        info = self.stat(key)
        if info.kind == "committed":
            return info.chain_id
        return self.record(key).parent_chain

    def cleanup(self) -> list[str]:
        """Delete what no snapshot references: what crashed operations left, orphaned snapshot
        dirs, references held by no snapshot, trash, stale tree caches."""
        removed = [r for r in self.store.recover().repaired]
        with self.store.db.tx():  # holds off concurrent prepares while their dirs are judged
            ids = {str(r.id) for r in self.db.all() if r.kind == "active"}
            for d in sorted(self.snapshots_dir.iterdir()):
                if d.name not in ids and d != self.trash_dir:
                    dst = self.trash_dir / f"{d.name}-{uuid.uuid4().hex}"
                    os.rename(d, dst)
                    removed.append(str(d))
        for d in sorted(self.trash_dir.iterdir()):
            rmtree(d)
            removed.append(str(d))
        for chain, holder in self._orphan_holders():
            if self.store.drop_holder(holder):
                removed.append(f"reference {holder} on layer {chain}")
        live = {li.chain_id for li in self.store.list()}
        with self.store.db.tx() as t:
            for chain in self.db.updated_layers():
                if chain not in live:
                    SnapshotDB.forget_layer(t, chain)
        removed += self.trees.prune(live)
        return removed

    def _orphan_holders(self) -> list[tuple[str, str]]:
        """(chain, holder) of snapshot references whose snapshot record does not exist."""
        owned = self.db.holders()
        return [(c, h) for c, h, _kind in self.store.holders(HOLDER_PREFIX) if h not in owned]

    # -- consistency ---------------------------------------------------------------------
    def check(self, repair: bool = False, rebuilt: bool = False) -> FsckReport:
        """The snapshot records against the store: references, layers, directories.

        `rebuilt`: the database was just rebuilt from the layers, so active snapshots are
        restored from the snapshot.json in their directories (views and committed names
        lived only in the database and are gone)."""
        rep = FsckReport()
        if rebuilt and repair:
            self._restore_committed(rep)
            self._restore_actives(rep)
        recs = self.db.all()
        for chain, holder in self._orphan_holders():
            if repair and self.store.drop_holder(holder):
                rep.repaired.append(f"dropped reference {holder} on layer {chain}: no snapshot holds it")
            else:
                rep.problems.append(f"layer {chain} is referenced by {holder}, which no snapshot holds")
        ids = set()
        for rec in recs:
            rep.checked += 1
            for c in (rec.chain_id, rec.parent_chain):
                if c and not self.store.exists(c):
                    rep.problems.append(f"snapshot {rec.name!r}: its layer {c} does not exist")
            if rec.kind == "active":
                ids.add(str(rec.id))
                if not (self.snapshot_dir(rec.id) / "upper").is_dir():
                    rep.problems.append(f"snapshot {rec.name!r}: its directory {self.snapshot_dir(rec.id)} is missing")
        with self.store.db.tx():  # holds off concurrent prepares while their dirs are judged
            ids |= {str(r.id) for r in self.db.all() if r.kind == "active"}
            for d in sorted(self.snapshots_dir.iterdir()):
                if d.name in ids or d == self.trash_dir:
                    continue
                if repair:
                    self.store.layout.trash(d)
                    rep.repaired.append(f"removed {d} (no snapshot owns it)")
                else:
                    rep.problems.append(f"directory {d} belongs to no snapshot")
        return rep

    def _restore_committed(self, rep: FsckReport) -> None:
        """Committed records from the layer records their commits wrote (parents first)."""
        for li in self.store.list():
            try:
                lrec = self.store.layer_record(li.chain_id)
            except FusesnapError:
                continue
            meta = (lrec.note if lrec else {}).get("snapshot")
            if not meta or self.exists(meta["name"]):
                continue
            parent = meta.get("parent", "")
            if parent and not self.exists(parent):
                parent = li.parent or ""
            holder = _new_holder()
            with self.store.db.tx() as t:
                self.store.db.add_ref(t, li.chain_id, holder, "ref")
                SnapshotDB.insert(t, meta["name"], "committed", parent, li.parent, li.chain_id, holder,
                                  dict(meta.get("labels") or {}), int(meta.get("created_ns") or now_ns()))
            rep.repaired.append(f"restored committed snapshot {meta['name']!r} from the record of {li.chain_id}")

    def _restore_actives(self, rep: FsckReport) -> None:
        known = self.db.ids()
        for d in sorted(self.snapshots_dir.iterdir(), key=lambda p: p.name):
            if not d.name.isdigit() or int(d.name) in known:
                continue
            try:
                meta = json.loads((d / SNAPSHOT_RECORD).read_text())
            except (OSError, ValueError):
                continue
            name, parent_chain = meta["name"], meta.get("parent_chain")
            if self.exists(name) or (parent_chain and not self.store.exists(parent_chain)):
                continue
            parent = meta.get("parent", "")
            if parent and not self.exists(parent):
                parent = parent_chain or ""
            holder = _new_holder()
            with self.store.db.tx() as t:
                if parent_chain:
                    self.store.db.add_ref(t, parent_chain, holder, "ref")
                SnapshotDB.insert(t, name, meta.get("kind", "active"), parent, parent_chain, None, holder,
                                  dict(meta.get("labels") or {}), int(meta.get("created_ns") or now_ns()),
                                  int(d.name))
            rep.repaired.append(f"restored active snapshot {name!r} from {d / SNAPSHOT_RECORD}")


def fsck_store(root: Path | str, repair: bool = False) -> FsckReport:
    """`fusesnap fsck`: the database file, the store's layers and leftovers, the snapshot records.

    A missing, empty or damaged database is reported (one line naming the file); with
    repair it is moved aside and rebuilt from the layers' own records, and active
    snapshots from theirs."""
    rep = FsckReport()
    layout = StoreLayout(Path(root))
    why = database_problem(layout)
    rebuilt = False
    if why is not None:
        if not repair:
            rep.problems.append(why)
            return rep
        rep.repaired.append(set_database_aside(layout))
        rebuilt = True
    with LayerStore(root, check=False, finish=repair) as store, Snapshotter(root, store) as sn:
        rep.merge(store.fsck(repair))
        rep.merge(sn.check(repair, rebuilt))
    return rep


def _digest_of(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return "sha256:" + h.hexdigest()


def mount_all(mounts: Iterable["Mount"], target: str | os.PathLike) -> None:
    """Perform mounts as returned by Snapshotter.mounts() (containerd's mount.All)."""
    for m in mounts:
        if m.type != "fuse3.fusesnap":
            raise InvalidInput(f"unsupported mount type {m.type!r}")
        kv, own = split_mount_options(m.options)
        root, key = kv.get("root"), kv.get("snapshot")
        if not root or not key:
            raise InvalidInput("fusesnap mount lacks root= or snapshot= options")
        with Snapshotter(root) as sn:
            rc = mount_snapshot(sn, key, target, options=own)
        if rc != 0:
            raise FusesnapError(f"mounting snapshot {key!r} at {target} failed (exit {rc})")
