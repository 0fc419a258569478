"""Optimize: a new image whose layers put a record's files first (stargz-snapshotter's optimizer).

Each recorded path is resolved in the image's merged tree; the layer serving
it is rewritten so that its recorded files come first, in recorded order,
followed by the `.prefetch.landmark` entry (images/layerorder.py). Every
member keeps its bytes, so every layer keeps its content and the merged tree
is the original's (the landmarks are hidden by store mounts); the layers'
diffIDs change. The new layers are imported into the store, compressed into
kept blobs, and recorded as image NAME with a new config (rootfs.diff_ids
replaced, history kept) and an OCI manifest, so `fusesnap push NAME` sends it
like any pulled image. A failure removes the layers this run created; the layers
of a killed run are released by the next pull, as a killed pull's are.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..digest import chain_id as make_chain_id
from ..errors import IntegrityError, InvalidInput, NotFound
from ..snapshots.accessrecord import RecordEntry, first_accesses
from ..snapshots.recorder import ChainView, RecordError
from ..store.locks import FileLock
from . import layerorder
from . import manifest as mf
from .blobs import BlobDir
from .events import Events
from .pull import HOLDER_PREFIX, images_dir, rollback
from .push import COMPRESSIONS, CompressingWriter
from .records import ImageRecord, ImageRecords, now

if TYPE_CHECKING:
    from ..store.layerstore import LayerStore

log = logging.getLogger("fusesnap.images")


@dataclass
class LayerResult:
    index: int
    chain_id: str           # the new layer
    diff_id: str
    source_chain_id: str    # the layer it was rewritten from
    moved: int              # recorded files now at the front
    stuck: list[str] = field(default_factory=list)   # recorded files that had to stay in place


@dataclass
class OptimizeResult:
    record: ImageRecord
    layers: list[LayerResult]
    missing: list[str]      # recorded paths the image does not serve (made by the workload, deleted...)

    def to_json(self) -> dict[str, Any]:
        return {**self.record.summary(),
                "layer_results": [{"index": r.index, "chain_id": r.chain_id, "diff_id": r.diff_id,
                                   "source_chain_id": r.source_chain_id, "moved": r.moved, "stuck": r.stuck}
                                  for r in self.layers],
                "missing": self.missing}


class Optimizer:
    def __init__(self, store: "LayerStore", image: str, entries: Sequence[RecordEntry], name: str, *,
                 compression: str = "gzip", events: Events | None = None) -> None:
        if compression not in COMPRESSIONS:
            raise InvalidInput(f"unknown compression {compression!r} (gzip, zstd or none)")
        if not name:
            raise InvalidInput("the new image needs a name (--name)")
        self.store, self.image, self.entries, self.name = store, image, entries, name
        self.compression = compression
        self.events = events or Events()
        self.records = ImageRecords(store)
        self.blobs = BlobDir(images_dir(store))
        # Retained like a pull's layers, under a run id whose lock file is flocked while this runs,
        # so that the next pull releases the retains of an optimize that was killed.
        self.run_id = secrets.token_hex(8)
        self.holder = HOLDER_PREFIX + self.run_id

    def _wanted(self, rec: ImageRecord) -> tuple[dict[int, list[bytes]], list[str]]:
        """Per layer index, the layer paths to put first, in recorded order; and the misses."""
        view = ChainView(self.store, rec.top_chain)
        wanted: dict[int, list[bytes]] = {}
        missing: list[str] = []
        for e in first_accesses(self.entries):
            try:
                s = view.resolve(e.path)
            except RecordError:
                missing.append(e.path)
                continue
            names = wanted.setdefault(s.layer_index, [])
            p = os.fsencode(s.path)
            if p not in names:
                names.append(p)
        return wanted, missing

    def run(self) -> OptimizeResult:
        runs = images_dir(self.store) / "pulls"
        runs.mkdir(mode=0o700, exist_ok=True)
        lock = runs / f"{self.run_id}.lock"
        try:
            with FileLock(lock):
                return self._run()
        finally:
            lock.unlink(missing_ok=True)

    def _run(self) -> OptimizeResult:
        rec = self.records.get(self.image)
        chain = rec.chain
        if not chain:
            raise InvalidInput(f"image {rec.name} has no layers to optimize")
        for i, c in enumerate(chain):
            if not self.store.exists(c):
                raise NotFound(f"layer {i} of image {rec.name} ({c}) is not in the store")
        wanted, missing = self._wanted(rec)
        self.events.begin([(c, self.store.get(c).tar_size) for c in chain])
        created: list[str] = []
        retained: list[str] = []
        blobs: list[Path] = []      # compressed layers, adopted as kept blobs once the record exists
        results: list[LayerResult] = []
        descs: list[mf.Descriptor] = []
        try:
            parent: str | None = None
            for i, c in enumerate(chain):
                res, desc = self._layer(i, c, parent, wanted.get(i, []), created, retained, blobs)
                results.append(res)
                descs.append(desc)
                parent = res.chain_id
            doc = copy.deepcopy(rec.parsed_config.doc)
            doc["rootfs"] = {**doc.get("rootfs", {}), "type": "layers", "diff_ids": [r.diff_id for r in results]}
            config = mf.dumps(doc)
            cdesc = mf.Descriptor(mf.OCI_CONFIG, "sha256:" + hashlib.sha256(config).hexdigest(), len(config))
            manifest = mf.oci_manifest(cdesc, descs)
            new = ImageRecord(self.name, "sha256:" + hashlib.sha256(manifest).hexdigest(), mf.OCI_MANIFEST,
                              manifest, config, parent, f"optimize:{rec.name}", now())
            if self.compression != "none":
                for path, d in zip(blobs, descs):
                    self.blobs.adopt(path, d.digest)
            old = self.records.put(new, release=self.holder)
            if old is not None:
                self.blobs.remove_unlisted(self.records.kept_blobs())
        except BaseException:
            rollback(self.store, created, retained, self.holder, "optimize")
            raise
        finally:
            for path in blobs:
                path.unlink(missing_ok=True)
            self.events.end()
        log.info("optimize: %s -> %s, %d recorded files placed first", rec.name, self.name,
                 sum(r.moved for r in results))
        return OptimizeResult(new, results, missing)

    def _layer(self, i: int, source: str, parent: str | None, wanted: list[bytes], created: list[str],
               retained: list[str], blobs: list[Path]) -> tuple[LayerResult, mf.Descriptor]:
        """Rewrite layer i on top of `parent` (the new chain below it), import it, compress it
        (into a file appended to `blobs` unless uncompressed)."""
        orig = self.blobs.temp_path("optimize-in-")
        tar = self.blobs.temp_path("optimize-tar-")
        try:
            self.events.state(i, "rewriting")
            with open(orig, "w+b") as f:
                self.store.export(source, f)
                f.seek(0)
                spans = layerorder.scan(f, f"layer {i} ({source})")
                plan = layerorder.reorder(spans, wanted)
                with open(tar, "wb") as out:
                    diff_id = layerorder.write(f, spans, plan.order, out)
            orig.unlink()
            new_chain = make_chain_id(parent, diff_id)
            existed = self.store.exists(new_chain)
            self.events.state(i, "importing")
            with open(tar, "rb") as f:
                info = self.store.import_tar(f, parent, retain=self.holder)
            retained.append(info.chain_id)
            if not existed and info.chain_id == new_chain:
                created.append(info.chain_id)
            if info.chain_id != new_chain:
                raise IntegrityError(f"layer {i} was written as {diff_id} but imported as {info.diff_id}")
            desc = mf.Descriptor(mf.OCI_LAYER_TYPE["none"], diff_id, os.path.getsize(tar))
            if self.compression != "none":
                self.events.state(i, "compressing")
                blob = self.blobs.temp_path("optimize-blob-")
                blobs.append(blob)
                with open(tar, "rb") as f, open(blob, "wb") as out:
                    w = CompressingWriter(out, self.compression)
                    while b := f.read(layerorder.CHUNK):
                        w.write(b)
                    desc = mf.Descriptor(mf.OCI_LAYER_TYPE[self.compression], w.finish(), w.size)
        finally:
            orig.unlink(missing_ok=True)
            tar.unlink(missing_ok=True)
        self.events.state(i, "done")
        return LayerResult(i, info.chain_id, diff_id, source, len(plan.moved),
                           [os.fsdecode(p) for p in plan.stuck]), desc


def optimize(store: "LayerStore", image: str, entries: Sequence[RecordEntry], name: str,
             **kw: Any) -> OptimizeResult:
    return Optimizer(store, image, entries, name, **kw).run()
