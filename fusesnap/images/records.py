"""Image records: NAME -> manifest (verbatim), config (verbatim), top chainID.

They live in the store's metadata.db (table `images`), written through
LayerStore.transaction(), so a record and the store reference that keeps its
layers from gc (holder `image:NAME` on the top chainID; a layer's children keep
its parents) appear and disappear together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..digest import chain_ids
from ..errors import InvalidInput, NotFound
from . import manifest as mf
from .reference import parse_docker

if TYPE_CHECKING:
    from ..store.layerstore import LayerStore, StoreTransaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    name            TEXT PRIMARY KEY,
    manifest_digest TEXT NOT NULL,
    media_type      TEXT NOT NULL,
    manifest        BLOB NOT NULL,   -- verbatim, as pulled (or as fusesnap wrote it)
    config          BLOB NOT NULL,   -- verbatim
    top_chain       TEXT,            -- NULL for an image without layers
    source          TEXT NOT NULL,   -- where it was pulled from
    created         TEXT NOT NULL
)
"""
_COLS = "name, manifest_digest, media_type, manifest, config, top_chain, source, created"


def holder_of(name: str) -> str:
    return f"image:{name}"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class ImageRecord:
    name: str
    manifest_digest: str
    media_type: str
    manifest: bytes
    config: bytes
    top_chain: str | None
    source: str
    created: str

    @property
    def parsed_manifest(self) -> mf.Manifest:
        m = mf.parse(self.manifest, self.media_type)
        assert isinstance(m, mf.Manifest)
        return m

    @property
    def parsed_config(self) -> mf.ImageConfig:
        return mf.ImageConfig.parse(self.config)

    @property
    def chain(self) -> list[str]:
        return chain_ids(self.parsed_config.diff_ids)

    def summary(self) -> dict[str, Any]:
        m = self.parsed_manifest
        return {"name": self.name, "manifest_digest": self.manifest_digest, "top_chain": self.top_chain,
                "layers": len(m.layers), "size": sum(d.size for d in m.layers) + m.config.size,
                "platform": self.parsed_config.platform, "source": self.source, "created": self.created}

    def details(self) -> dict[str, Any]:
        m, cfg = self.parsed_manifest, self.parsed_config
        rt = cfg.runtime
        out = self.summary()
        out.update({
            "media_type": self.media_type, "config_digest": m.config.digest,
            "entrypoint": rt.get("Entrypoint"), "cmd": rt.get("Cmd"), "env": rt.get("Env") or [],
            "working_dir": rt.get("WorkingDir") or "", "user": rt.get("User") or "",
            "labels": rt.get("Labels") or {}, "exposed_ports": sorted((rt.get("ExposedPorts") or {}).keys()),
            "created_at": cfg.doc.get("created"),
            "layer_details": [{"digest": d.digest, "media_type": d.media_type, "size": d.size, "diff_id": diff,
                               "chain_id": chain} for d, diff, chain in zip(m.layers, cfg.diff_ids, self.chain)],
            "history": cfg.doc.get("history") or [],
        })
        return out


def _row(r: tuple[Any, ...]) -> ImageRecord:
    name, digest, mt, manifest, config, top, source, created = r
    return ImageRecord(name, digest, mt, bytes(manifest), bytes(config), top, source, created)


class ImageRecords:
    def __init__(self, store: "LayerStore") -> None:
        self.store = store
        with store.transaction() as tx:
            tx.execute(SCHEMA)

    def _get(self, tx: "StoreTransaction", name: str) -> ImageRecord | None:
        r = tx.execute(f"SELECT {_COLS} FROM images WHERE name=?", (name,)).fetchone()
        return _row(r) if r else None

    def find(self, name: str) -> ImageRecord | None:
        """By exact name, else by the normalized docker name (`busybox` -> docker.io/library/busybox:latest)."""
        with self.store.transaction() as tx:
            rec = self._get(tx, name)
            if rec is None:
                try:
                    norm = parse_docker(name.removeprefix("docker://")).name()
                except InvalidInput:
                    return None
                rec = self._get(tx, norm)
            return rec

    def get(self, name: str) -> ImageRecord:
        rec = self.find(name)
        if rec is None:
            raise NotFound(f"no such image: {name}")
        return rec

    def list(self) -> list[ImageRecord]:
        with self.store.transaction() as tx:
            return [_row(r) for r in tx.execute(f"SELECT {_COLS} FROM images ORDER BY name").fetchall()]

    def put(self, rec: ImageRecord, release: str | None = None) -> ImageRecord | None:
        """Create or replace NAME's record, move its reference to the new top layer and drop the
        pull's retains (`release`), all in one transaction. Returns the record it replaced."""
        holder = holder_of(rec.name)
        with self.store.transaction() as tx:
            old = self._get(tx, rec.name)
            if old is not None and old.top_chain and old.top_chain != rec.top_chain:
                tx.drop_ref(old.top_chain, holder)
            if rec.top_chain:
                tx.add_ref(rec.top_chain, holder)
            tx.execute(f"INSERT OR REPLACE INTO images({_COLS}) VALUES (?,?,?,?,?,?,?,?)",
                       (rec.name, rec.manifest_digest, rec.media_type, rec.manifest, rec.config, rec.top_chain,
                        rec.source, rec.created))
            if release:
                tx.release_all(release)
        return old

    def remove(self, name: str) -> ImageRecord:
        rec = self.get(name)
        with self.store.transaction() as tx:
            if self._get(tx, rec.name) is None:
                raise NotFound(f"no such image: {name}")
            tx.execute("DELETE FROM images WHERE name=?", (rec.name,))
            if rec.top_chain:
                tx.drop_ref(rec.top_chain, holder_of(rec.name))
        return rec

    def base_of(self, chain: list[str]) -> ImageRecord | None:
        """The image whose layers are the longest prefix of `chain` (bottom-to-top chainIDs)."""
        pos = {c: i for i, c in enumerate(chain)}
        best: tuple[int, ImageRecord] | None = None
        for rec in self.list():
            if rec.top_chain in pos and (best is None or pos[rec.top_chain] > best[0]):
                best = (pos[rec.top_chain], rec)
        return best[1] if best else None

    def kept_blobs(self) -> set[str]:
        """Layer digests any record names (the kept-blob cache keeps exactly these)."""
        out: set[str] = set()
        for rec in self.list():
            out.update(d.digest for d in rec.parsed_manifest.layers)
        return out
