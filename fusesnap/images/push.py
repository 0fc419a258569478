"""Push: a chain of store layers (an image record, a layer or a committed snapshot) to a destination.

The config: an image pushed unchanged keeps its own, verbatim; a chain built
on an image (a commit on top of a pulled one) gets that image's config with
rootfs.diff_ids set to the chain's diffIDs and one history entry per new layer;
a chain with no image below gets a minimal config. Layers: the store exports
each tar byte for byte (so uncompressed digests equal the diffIDs) and gzip
compresses it by default (`zstd` or `none` on request); a pulled layer whose
original blob was kept (images/blobs) is sent as those bytes, so an image
pushed back unchanged keeps its layer, config and manifest digests. Blobs the
destination has are skipped (registry: HEAD, then a cross-repository mount
from the repository the image came from on the same registry).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import zstandard

from ..errors import IntegrityError, InvalidInput, NotFound
from ..snapshots.names import chain_of_name
from . import manifest as mf
from .blobs import BlobDir
from .events import Counter, Events
from .pull import images_dir
from .records import ImageRecord, ImageRecords, now
from .reference import ImageRef, parse_ref
from .registry import RemoteOptions
from .transports import ImageDestination, RegistryDestination, open_destination

if TYPE_CHECKING:
    from ..store.layerstore import LayerInfo, LayerStore

log = logging.getLogger("fusesnap.images")

COMPRESSIONS = ("gzip", "zstd", "none")
GZIP_LEVEL = 6   # Go's compress/gzip default, what docker and containers/image write
ZSTD_LEVEL = 3
MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"))


@dataclass
class PushResult:
    manifest_digest: str
    layers: int
    skipped: int       # blobs the destination already had (or mounted)
    uploaded: int      # blobs written
    bytes: int


@dataclass
class _Blob:
    desc: mf.Descriptor
    src: Path | bytes | None = None   # a kept blob, a temp file or bytes; None until produced
    chain: str | None = None          # layer blobs: the chain to export if src is None
    compression: str = "none"


class CompressingWriter:
    """A write() target for LayerStore.export that compresses into a file and hashes the output."""

    def __init__(self, f: BinaryIO, compression: str) -> None:
        self.f, self.compression = f, compression
        self.hash = hashlib.sha256()
        self.size = 0
        self._c: Any = None
        if compression == "gzip":
            self._c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        elif compression == "zstd":
            self._c = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1).compressobj()

    def _out(self, b: bytes) -> None:
        if b:
            self.hash.update(b)
            self.size += len(b)
            self.f.write(b)

    def write(self, b: bytes | bytearray | memoryview) -> int:
        self._out(bytes(b) if self._c is None else self._c.compress(b))
        return len(b)

    def flush(self) -> None:
        pass

    def finish(self) -> str:
        if self._c is not None:
            self._out(self._c.flush())
        return "sha256:" + self.hash.hexdigest()


def _magic(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    return next((c for m, c in MAGIC if head.startswith(m)), "none")


class Pusher:
    def __init__(self, store: "LayerStore", source: str, dest: ImageRef, *, compression: str | None = None,
                 opts: RemoteOptions | None = None, jobs: int = 3, events: Events | None = None) -> None:
        if compression is not None and compression not in COMPRESSIONS:
            raise InvalidInput(f"unknown compression {compression!r} (gzip, zstd or none)")
        self.store, self.source, self.dest = store, source, dest
        self.opts, self.jobs = opts or RemoteOptions(), max(1, jobs)
        self.events = Counter(events or Events())
        self.records = ImageRecords(store)
        self.blobs = BlobDir(images_dir(store))
        # docker-archive holds uncompressed layer tars (what docker load and podman load expect)
        self.compression = "none" if dest.transport == "docker-archive" else compression
        self._temps: list[Path] = []

    # -- what to push ---------------------------------------------------------------------
    def _resolve(self) -> tuple[ImageRecord | None, ImageRecord | None, list[str]]:
        """(the image itself if SOURCE names one, the image the chain builds on, bottom-to-top chain)."""
        rec = self.records.find(self.source)
        if rec is not None:
            return rec, rec, self.store.chain(rec.top_chain) if rec.top_chain else []
        try:
            top = self.store.get(self.source).chain_id
        except NotFound:
            top = chain_of_name(self.store.root, self.source)  # a committed snapshot's name
            if top is None:
                raise NotFound(f"no image, layer or committed snapshot named {self.source!r}") from None
        chain = self.store.chain(top)
        return None, self.records.base_of(chain), chain

    def _config(self, base: ImageRecord | None, layers: list["LayerInfo"]) -> bytes:
        diff_ids = [li.diff_id for li in layers]
        if base is not None:
            doc = copy.deepcopy(base.parsed_config.doc)
            base_n = len(base.parsed_config.diff_ids)
        else:
            host = mf.Platform.host()
            doc = {"architecture": host.architecture, "os": host.os, "config": {}}
            if host.variant:
                doc["variant"] = host.variant
            base_n = 0
        created = now()
        history = list(doc.get("history") or [])
        for li in layers[base_n:]:
            history.append({"created": created, "created_by": "fusesnap commit",
                            "comment": f"layer {li.chain_id}"})
        doc.update({"created": created, "rootfs": {"type": "layers", "diff_ids": diff_ids}, "history": history})
        return mf.dumps(doc)

    def _kept(self, li: "LayerInfo", want: str | None, original: mf.Descriptor | None) -> _Blob | None:
        """A kept original blob of this layer in the wanted compression (any, if none was asked for)."""
        cands = ([original.digest] if original else []) + li.compressed_digests
        for digest in cands:
            if not self.blobs.has(digest):
                continue
            comp = _magic(self.blobs.path(digest))
            if want is None or comp == want:
                mt = original.media_type if original and original.digest == digest else mf.OCI_LAYER_TYPE[comp]
                size = self.blobs.path(digest).stat().st_size
                return _Blob(mf.Descriptor(mt, digest, size), self.blobs.path(digest), li.chain_id, comp)
        return None

    def _plan(self) -> tuple[mf.Manifest | None, bytes, list[_Blob], ImageRecord | None]:
        """(the manifest when it can be sent verbatim, config bytes, layer blobs, image it builds on)."""
        rec, base, chain = self._resolve()
        layers = [self.store.get(c) for c in chain]
        originals: list[mf.Descriptor] = []
        if base is not None:
            bm = base.parsed_manifest
            bdiffs = base.parsed_config.diff_ids
            if [li.diff_id for li in layers[:len(bdiffs)]] == bdiffs:
                originals = bm.layers
        blobs: list[_Blob] = []
        for i, li in enumerate(layers):
            original = originals[i] if i < len(originals) else None
            if original is not None and mf.LAYER_COMPRESSION.get(original.media_type) == "none" \
                    and self.compression in (None, "none"):
                blobs.append(_Blob(original, None, li.chain_id, "none"))
                continue
            want = self.compression or (None if original else "gzip")  # an original keeps its compression
            kept = self._kept(li, want, original) if want != "none" else None
            if kept is None:
                comp = self.compression or "gzip"
                kept = _Blob(mf.Descriptor(mf.OCI_LAYER_TYPE[comp], "", 0), None, li.chain_id, comp)
            blobs.append(kept)
        verbatim: mf.Manifest | None = None
        if rec is not None and len(originals) == len(blobs) and \
                all(b.desc.digest == o.digest for b, o in zip(blobs, originals)):
            m = rec.parsed_manifest
            if self.dest.is_registry or m.media_type == mf.OCI_MANIFEST:
                verbatim = m
            return verbatim, rec.config, blobs, base
        config = rec.config if rec is not None else self._config(base, layers)
        return None, config, blobs, base

    # -- producing layer blobs -----------------------------------------------------------
    def _produce(self, i: int, b: _Blob) -> None:
        """Export layer i into a temp file in its compression; fill in digest and size."""
        if b.src is not None or b.chain is None:
            return
        self.events.state(i, "compressing" if b.compression != "none" else "exporting")
        tmp = self.blobs.temp_path("push-")
        self._temps.append(tmp)
        with open(tmp, "wb") as f:
            w = CompressingWriter(f, b.compression)
            self.store.export(b.chain, w)  # type: ignore[arg-type]
            digest = w.finish()
        if b.desc.digest and digest != b.desc.digest:
            raise IntegrityError(f"layer {b.chain} exported as {digest}, expected {b.desc.digest}")
        b.desc = mf.Descriptor(b.desc.media_type or mf.OCI_LAYER_TYPE[b.compression], digest, w.size)
        b.src = tmp

    # -- sending --------------------------------------------------------------------------
    def _send(self, dst: ImageDestination, i: int, b: _Blob, mount_from: str | None) -> bool:
        """True when the blob was written, False when the destination had it."""
        if dst.has_blob(b.desc):
            self.events.state(i, "exists")
            return False
        if mount_from and isinstance(dst, RegistryDestination) and dst.mount_from(b.desc, mount_from):
            self.events.state(i, "mounted")
            return False
        self.events.state(i, "uploading")
        assert b.src is not None
        dst.put_blob(b.desc, b.src, lambda n: self.events.advance(i, n))
        self.events.state(i, "done")
        return True

    def run(self) -> PushResult:
        verbatim, config, blobs, base = self._plan()
        cdesc = mf.Descriptor(mf.OCI_CONFIG if verbatim is None or verbatim.media_type == mf.OCI_MANIFEST
                              else verbatim.config.media_type,
                              "sha256:" + hashlib.sha256(config).hexdigest(), len(config))
        mount_from = self._mount_source(base)
        self.events.begin([(b.chain or f"layer {i}", b.desc.size) for i, b in enumerate(blobs)] + [("config", len(config))])
        dst = open_destination(self.dest, self.opts)
        try:
            with ThreadPoolExecutor(self.jobs, thread_name_prefix="push") as pool:
                list(pool.map(lambda ib: self._produce(*ib), enumerate(blobs)))
                if isinstance(dst, RegistryDestination):
                    sent = list(pool.map(lambda ib: self._send(dst, ib[0], ib[1], mount_from), enumerate(blobs)))
                else:
                    sent = [self._send(dst, i, b, None) for i, b in enumerate(blobs)]
            config_sent = self._send(dst, len(blobs), _Blob(cdesc, config), None)
            if verbatim is None:
                layers = [mf.Descriptor(mf.OCI_LAYER_TYPE[mf.LAYER_COMPRESSION.get(b.desc.media_type, b.compression)],
                                        b.desc.digest, b.desc.size) for b in blobs]
                m = mf.parse(mf.oci_manifest(cdesc, layers))
                assert isinstance(m, mf.Manifest)
            else:
                m = verbatim
            digest = dst.put_manifest(m, config)
            dst.commit()
        finally:
            dst.close()
            for t in self._temps:
                t.unlink(missing_ok=True)
            self.events.end()
        uploaded = sum(sent) + int(config_sent)
        return PushResult(digest, len(blobs), len(blobs) + 1 - uploaded, uploaded, self.events.bytes)

    def _mount_source(self, base: ImageRecord | None) -> str | None:
        """The repository on the same registry the base image came from (for cross-repo mounts)."""
        if base is None or not self.dest.is_registry:
            return None
        try:
            src = parse_ref(base.source)
        except InvalidInput:
            return None
        if src.is_registry and src.registry == self.dest.registry and src.repository != self.dest.repository:
            return src.repository
        return None


def push(store: "LayerStore", source: str, dest: ImageRef, **kw: Any) -> PushResult:
    return Pusher(store, source, dest, **kw).run()
