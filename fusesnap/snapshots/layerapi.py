"""Moby's layer-store API (the design fusesnap started from) over the snapshotter.

- read-only layers: register a tar, get/map by chainID, release; size() of
  the chain, diff_size() of the layer, metadata(), tar_stream() (the stored
  tar, byte for byte) and tar_stream_from(ancestor) (everything above an
  ancestor squashed into one changeset);
- read-write layers: create_rw_layer(name, parent, init_func) with moby's
  init layer (`NAME-init`, prepared once by init_func and committed below the
  container's layer so that changes() and tar_stream() leave it out), a mount
  reference count (mount twice, unmount twice: one FUSE mount), changes(),
  size() and metadata().
"""

from __future__ import annotations

import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Literal

from ..errors import InUse, InvalidInput, NotFound
from . import changeset
from .snapshotter import Snapshotter

ChangeKind = Literal["A", "C", "D"]  # moby's archive.ChangeAdd / ChangeModify / ChangeDelete


@dataclass(frozen=True, order=True)
class Change:
    path: str  # absolute, as moby reports it ("/etc/hosts")
    kind: ChangeKind

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


class ROLayer:
    """A committed layer of the store, identified by chainID."""

    def __init__(self, api: "LayerAPI", chain_id: str, holder: str | None = None) -> None:
        self._api = api
        self.chain_id = chain_id
        self.holder = holder

    def _info(self):
        return self._api.store.get(self.chain_id)

    @property
    def diff_id(self) -> str:
        return self._info().diff_id

    def parent(self) -> "ROLayer | None":
        p = self._info().parent
        return ROLayer(self._api, p) if p else None

    def size(self) -> int:
        """Bytes of the whole chain (this layer and all below)."""
        return self._info().size

    def diff_size(self) -> int:
        """Bytes this layer adds."""
        return self._info().diff_size

    def metadata(self) -> dict[str, str]:
        li = self._info()
        return {
            "ChainID": li.chain_id,
            "DiffID": li.diff_id,
            "Parent": li.parent or "",
            "LayerDir": str(self._api.store.fs_dir(li.chain_id)),
            "Size": str(li.size),
            "DiffSize": str(li.diff_size),
            "Created": li.created,
        }

    def tar_stream(self, dst: BinaryIO) -> None:
        """The layer's own tar, exactly as imported (or committed)."""
        self._api.store.export(self.chain_id, dst)

    def tar_stream_from(self, ancestor: str | None, dst: BinaryIO) -> None:
        """The changes between `ancestor` (a chainID below this layer, or None: nothing) and this layer."""
        chain = self._api.store.chain(self.chain_id)
        if ancestor:
            if ancestor not in chain:
                raise InvalidInput(f"layer {ancestor} is not an ancestor of {self.chain_id}")
            above = chain[chain.index(ancestor) + 1 :]
        else:
            above = chain
        store = self._api.store
        members = changeset.squash_members((store.entries(c), store.fs_dir(c)) for c in above)
        for chunk in changeset.tar_chunks(members):
            dst.write(chunk)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ROLayer) and other.chain_id == self.chain_id

    def __hash__(self) -> int:
        return hash(self.chain_id)

    def __repr__(self) -> str:
        return f"ROLayer({self.chain_id})"


class RWLayer:
    """A container's writable layer: an active snapshot (on top of its init layer, if any)."""

    def __init__(self, api: "LayerAPI", name: str, parent: str | None, init: str | None) -> None:
        self._api = api
        self.name = name
        self.parent_chain = parent
        self.init_name = init

    @property
    def sn(self) -> Snapshotter:
        return self._api.sn

    def parent(self) -> ROLayer | None:
        return ROLayer(self._api, self.parent_chain) if self.parent_chain else None

    @property
    def mountpoint(self) -> Path:
        return self._api.mount_root / self.name

    @property
    def mount_count(self) -> int:
        return self._api.mounts.count(self.name)

    def mount(self) -> Path:
        """Mount (first call) or just count another user of the mount; returns the merged dir."""
        if self.mount_count == 0:
            mp = self.mountpoint
            mp.mkdir(parents=True, exist_ok=True)
            rc = self.sn.mount(self.name, mp)
            if rc != 0:
                raise InvalidInput(f"mounting layer {self.name!r} failed (exit {rc})")
        self._api.mounts.take(self.name)
        return self.mountpoint

    def unmount(self) -> None:
        """Drop one mount reference; the last one unmounts."""
        n = self.mount_count
        if n == 0:
            raise InvalidInput(f"layer {self.name!r} is not mounted")
        if n == 1:
            self.sn.umount(self.mountpoint)
            try:
                self.mountpoint.rmdir()
            except OSError:
                pass
        self._api.mounts.drop(self.name)

    def _upper(self) -> Path:
        return self.sn.upper_dir(self.name)

    def changes(self) -> list[Change]:
        """Paths added, modified and deleted relative to the layers below (init layer included)."""
        tree = self.sn.trees.get(self.sn.parent_chain(self.name))
        out: dict[str, ChangeKind] = {}
        cs = changeset.scan_upper(self._upper())
        try:
            self._collect(cs, tree, out)
        finally:
            cs.restore()
        return sorted(Change(p, k) for p, k in out.items())

    def _collect(self, cs: changeset.UpperChangeset, tree, out: dict[str, ChangeKind]) -> None:
        for m in cs.members:
            base = m.name.rsplit(b"/", 1)[-1]
            parent = m.name[: -len(base) - 1] if b"/" in m.name else b""
            if base == changeset.OPAQUE_MARKER:
                node = tree.lookup(parent)
                if node is not None and node.kids:
                    upper_dir = self._upper() / os.fsdecode(parent)
                    present = set(os.listdir(os.fsencode(upper_dir)))
                    for kid in node.kids:
                        if kid not in present:
                            out["/" + os.fsdecode(parent + b"/" + kid if parent else kid)] = "D"
                continue
            if base.startswith(changeset.WHITEOUT_PREFIX):
                target = (parent + b"/" if parent else b"") + base[len(changeset.WHITEOUT_PREFIX):]
                if tree.lookup(target) is not None:
                    out["/" + os.fsdecode(target)] = "D"
                continue
            node = tree.lookup(m.name)
            p = "/" + os.fsdecode(m.name)
            if node is None:
                out[p] = "A"
            elif m.kind == "dir" and node.is_dir() and stat.S_IMODE(node.mode) == m.mode and \
                    (node.uid, node.gid) == (m.uid, m.gid) and node.mtime_ns // 1_000_000_000 == changeset.mtime_s(m):
                continue  # only a parent of something that changed
            else:
                out[p] = "C"

    def size(self) -> int:
        """Bytes of file content this layer holds (hard links counted once)."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for dirpath, _dirs, files in os.walk(self._upper()):
            for f in files:
                st = os.lstat(os.path.join(dirpath, f))
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
        return total

    def metadata(self) -> dict[str, str]:
        upper = self._upper()
        md = {
            "UpperDir": str(upper),
            "WorkDir": str(upper.parent / "work"),
            "LowerChain": ":".join(self.sn.chain_of(self.name)),
        }
        if self.init_name:
            md["InitLayer"] = self.init_name
        if self.mount_count:
            md["MergedDir"] = str(self.mountpoint)
        return md

    def tar_stream(self, dst: BinaryIO) -> str:
        """The container's changes as a changeset tar (the init layer's files excluded); returns the diffID."""
        return self.sn.diff(self.name, dst)


class MountCounts:
    """How many users each read-write layer's mount has (moby's mount reference count)."""

    def __init__(self) -> None:
        self._n: dict[str, int] = {}

    def count(self, name: str) -> int:
        return self._n.get(name, 0)

    def take(self, name: str) -> None:
        self._n[name] = self._n.get(name, 0) + 1

    def drop(self, name: str) -> None:
        n = self._n.get(name, 0) - 1
        if n > 0:
            self._n[name] = n
        else:
            self._n.pop(name, None)


class LayerAPI:
    """Moby-style layer store facade; one per Snapshotter."""

    def __init__(self, sn: Snapshotter, mount_root: Path | str | None = None) -> None:
        self.sn = sn
        self.store = sn.store
        self.mount_root = Path(mount_root) if mount_root else sn.root / "mnt"
        self.mounts = MountCounts()

    # -- read-only layers -----------------------------------------------------------------
    def register(self, tar: BinaryIO, parent: str | None = None) -> ROLayer:
        """Import a layer tar on top of `parent`; the returned reference keeps it until release()."""
        li = self.store.import_tar(tar, parent)
        return self._ref(li.chain_id)

    def get(self, chain_id: str) -> ROLayer:
        li = self.store.get(chain_id)
        return self._ref(li.chain_id)

    def _ref(self, chain_id: str) -> ROLayer:
        holder = f"layerapi:{secrets.token_hex(6)}"
        self.store.add_ref(chain_id, holder)
        return ROLayer(self, chain_id, holder)

    def map(self) -> dict[str, ROLayer]:
        return {li.chain_id: ROLayer(self, li.chain_id) for li in self.store.list()}

    def release(self, layer: ROLayer) -> list[str]:
        """Drop a reference; delete the layer and then unreferenced parents. Returns removed chainIDs."""
        if layer.holder is None:
            raise InvalidInput(f"{layer!r} is not a reference obtained from register() or get()")
        self.store.drop_ref(layer.chain_id, layer.holder)
        layer.holder = None
        removed: list[str] = []
        cur: str | None = layer.chain_id
        while cur:
            li = self.store.get(cur)
            if li.refcount > 0 or self.sn.db.names_for_chain(cur):
                break
            try:
                self.store.remove(cur)
            except (InUse, NotFound):
                break
            removed.append(cur)
            cur = li.parent
        return removed

    # -- read-write layers -----------------------------------------------------------------
    def create_rw_layer(self, name: str, parent: str | None = None,
                        init_func: Callable[[Path], None] | None = None,
                        labels: dict[str, str] | None = None) -> RWLayer:
        """A writable layer on `parent` (chainID or committed name); init_func prepares its init layer."""
        parent_chain = self.sn.stat(parent).chain_id if parent else None
        if parent and parent_chain is None:
            raise InvalidInput(f"parent {parent!r} is not committed")
        if self.sn.exists(name):
            raise InvalidInput(f"layer {name!r} already exists")
        base = parent or ""
        init_name: str | None = None
        if init_func is not None:
            init_name = f"{name}-init"
            prep = f"{init_name}-prepare"
            self.sn.prepare(prep, base)
            mp = self.mount_root / prep
            mp.mkdir(parents=True, exist_ok=True)
            try:
                rc = self.sn.mount(prep, mp)
                if rc != 0:
                    raise InvalidInput(f"mounting the init layer of {name!r} failed (exit {rc})")
                try:
                    init_func(mp)
                finally:
                    self.sn.umount(mp)
                self.sn.commit(init_name, prep, {"fusesnap.io/init-for": name})
            except BaseException:
                if self.sn.exists(prep):
                    self.sn.remove(prep)
                raise
            finally:
                try:
                    mp.rmdir()
                except OSError:
                    pass
            base = init_name
        try:
            self.sn.prepare(name, base, labels)
        except BaseException:
            if init_name:
                self.sn.remove(init_name)
            raise
        return RWLayer(self, name, parent_chain, init_name)

    def get_rw_layer(self, name: str) -> RWLayer:
        info = self.sn.stat(name)
        if info.kind != "active":
            raise NotFound(f"read-write layer {name!r} does not exist")
        init_name = f"{name}-init" if info.parent == f"{name}-init" else None
        below = self.sn.stat(info.parent).chain_id if info.parent else None
        if init_name and below:  # the image layer is the init layer's parent
            below = self.store.get(below).parent
        return RWLayer(self, name, below, init_name)

    def release_rw_layer(self, layer: RWLayer) -> None:
        """Delete a read-write layer and its init layer; refused while mounted."""
        if layer.mount_count:
            raise InUse(f"layer {layer.name!r} is still mounted {layer.mount_count} time(s)")
        self.sn.remove(layer.name)
        if layer.init_name:
            self.sn.remove(layer.init_name)
