"""Pull: an image from any source into the layer store, then its record.

containerd's algorithm: for each layer in order, a compressed digest the store
already maps to the config's diffID, whose chain exists, transfers nothing;
every other layer is fetched (registries: in parallel, bounded, into
`images/downloads/`, verified while streaming, and imported while it arrives;
local layouts and archives are read in place, verified while importing),
imported on top of the previous chain and checked against the config's diffID. Layers are retained by the pull
(holder `pull:<run id>`, its liveness an flock on `images/pulls/<run id>.lock`)
until the record's reference replaces the retains in one transaction. Any
failure removes the layers this pull created, so the store is as before;
verified and partial downloads stay for the next attempt, which resumes them.
A kill -9 leaves the layers it imported, retained; the next pull releases the
retains of pulls whose lock nobody holds, and finds those layers present.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Sequence

from ..digest import chain_ids, hex_of
from ..errors import FusesnapError, IntegrityError, InUse, InvalidInput, NotFound
from ..snapshots.accessrecord import RecordEntry, layer_order
from ..store.locks import FileLock, is_locked
from . import manifest as mf
from .blobs import BlobDir, VerifyingReader, verify_bytes
from .download import Download, FollowingReader
from .events import Counter, Events
from .records import ImageRecord, ImageRecords, now
from .reference import ImageRef
from .registry import RemoteOptions
from .transports import ImageSource, RegistrySource, open_source

if TYPE_CHECKING:
    from ..store.layerstore import LayerStore

log = logging.getLogger("fusesnap.images")

STALE_DOWNLOAD = 7 * 86400  # seconds: an abandoned download is removed by a later pull
HOLDER_PREFIX = "pull:"    # + the pull's run id (images/pulls/<id>.lock is flocked while it runs)


def images_dir(store: "LayerStore") -> Path:
    d = store.root / "images"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


@dataclass
class PullResult:
    record: ImageRecord
    layers: int
    present: int          # layers the store had: nothing transferred
    transferred: int      # layer bytes fetched or read


class _Cancelled(Exception):
    pass


def resolve_manifest(src: ImageSource, platform: mf.Platform | None) -> tuple[mf.Manifest, str]:
    """The image manifest (an index resolved to `platform`, default this machine's) and its digest."""
    data, hint, expected = src.top_manifest()
    if expected:
        verify_bytes(data, expected, "manifest")
    m = mf.parse(data, hint)
    if isinstance(m, mf.Index):
        d = m.choose(platform or mf.Platform.host())
        data = verify_bytes(src.child_manifest(d), d.digest, "manifest")
        m = mf.parse(data, d.media_type)
        if isinstance(m, mf.Index):
            raise InvalidInput(f"{src.where}: nested image indexes are not supported")
    return m, "sha256:" + hashlib.sha256(data).hexdigest()


def fetch_config(src: ImageSource, m: mf.Manifest) -> mf.ImageConfig:
    raw = src.blob_bytes(m.config)
    if len(raw) != m.config.size:
        raise IntegrityError(f"config {m.config.digest} is {len(raw)} bytes, its descriptor says {m.config.size}")
    cfg = mf.ImageConfig.parse(verify_bytes(raw, m.config.digest, "config"))
    if len(cfg.diff_ids) != len(m.layers):
        raise InvalidInput(f"the config lists {len(cfg.diff_ids)} diff_ids but the manifest {len(m.layers)} layers")
    return cfg


class Puller:
    def __init__(self, store: "LayerStore", ref: ImageRef, *, name: str | None = None,
                 platform: mf.Platform | None = None, opts: RemoteOptions | None = None, jobs: int = 3,
                 events: Events | None = None, record: Sequence[RecordEntry] = ()) -> None:
        self.store, self.ref, self.name = store, ref, name or ref.name()
        self.platform, self.opts, self.jobs = platform, opts or RemoteOptions(), max(1, jobs)
        self.events = Counter(events or Events())
        self.dir = images_dir(store)
        self.downloads = self.dir / "downloads"
        self.downloads.mkdir(mode=0o700, exist_ok=True)
        self.blobs = BlobDir(self.dir)
        self.records = ImageRecords(store)
        self.record = record    # an access record: the layers it reads from are downloaded first
        self._stop = threading.Event()
        self.runs = self.dir / "pulls"
        self.runs.mkdir(mode=0o700, exist_ok=True)
        self.run_id = secrets.token_hex(8)

    def run(self) -> PullResult:
        # the flock marks this pull as alive: its retains are not a dead pull's
        with FileLock(self.runs / f"{self.run_id}.lock"):
            try:
                self.store.fsck_leftovers(repair=True)  # what an import killed before left behind
                self._release_dead_pulls()
                self._drop_stale_downloads()
                src = open_source(self.ref, self.opts)
                try:
                    m, digest = resolve_manifest(src, self.platform)
                    cfg = fetch_config(src, m)
                    return self._pull(src, m, digest, cfg)
                finally:
                    src.close()
            finally:
                (self.runs / f"{self.run_id}.lock").unlink(missing_ok=True)

    def _release_dead_pulls(self) -> None:
        """Retains of pulls that were killed: their layers become ordinary (gc may take them, the
        next pull of that image finds them present)."""
        with self.store.transaction() as tx:
            for holder in tx.retain_holders(HOLDER_PREFIX):
                lock = self.runs / f"{holder[len(HOLDER_PREFIX):]}.lock"
                if not is_locked(lock):
                    tx.release_all(holder)
                    lock.unlink(missing_ok=True)
                    log.info("pull: released the retains of a dead pull (%s)", holder)

    def _pull(self, src: ImageSource, m: mf.Manifest, digest: str, cfg: mf.ImageConfig) -> PullResult:
        diff_ids, chains = cfg.diff_ids, chain_ids(cfg.diff_ids)
        holder = HOLDER_PREFIX + self.run_id
        comps = [m.compression(i) for i in range(len(m.layers))]
        todo = []
        retained: list[str] = []
        for i, d in enumerate(m.layers):
            known = d.digest if comps[i] == "none" else self.store.diff_id_for(d.digest)
            if known is not None and known != diff_ids[i]:
                raise IntegrityError(f"layer {i} ({d.digest}) decompresses to {known}, but the config's diff_id "
                                     f"is {diff_ids[i]}")
            if known and self._retain(chains[i], holder):
                retained.append(chains[i])
            else:
                todo.append(i)
        self.events.begin([(d.digest, d.size) for d in m.layers])
        for i in range(len(m.layers)):
            self.events.state(i, "waiting" if i in todo else "exists")
        created: list[str] = []
        kept: list[tuple[Path, str]] = []
        pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="fetch") if src.remote and todo else None
        try:
            futures: dict[int, tuple[Future[Path], Download]] = {}
            if pool is not None:
                assert isinstance(src, RegistrySource)
                for i in self._fetch_order(todo, chains):
                    dl = Download(self.downloads / f"{hex_of(m.layers[i].digest)}.partial")
                    futures[i] = (pool.submit(self._download, src, i, m.layers[i], dl), dl)
            for i in todo:
                parent = chains[i - 1] if i else None
                existed = self.store.exists(chains[i])
                started = now()
                try:
                    info = self._import(src, m, i, futures.get(i), parent, comps[i], holder, kept)
                except FusesnapError as e:
                    if m.layers[i].digest in str(e):
                        raise
                    raise type(e)(f"layer {i} ({m.layers[i].digest}): {e}") from None
                if info.chain_id not in retained:
                    retained.append(info.chain_id)   # import_tar retained it for this pull
                # a layer whose diffID is not the config's has another chainID: new if created just now
                new = not existed if info.chain_id == chains[i] else info.created >= started
                if new and info.chain_id not in created:
                    created.append(info.chain_id)
                if info.diff_id != diff_ids[i]:
                    raise IntegrityError(f"layer {i} ({m.layers[i].digest}) decompresses to {info.diff_id}, but "
                                         f"the config's diff_id is {diff_ids[i]}")
                self.events.state(i, "done")
            for path, blob_digest in kept:
                self.blobs.adopt(path, blob_digest)
            rec = ImageRecord(self.name, digest, m.media_type, m.raw, cfg.raw, chains[-1] if chains else None,
                              str(self.ref), now())
            old = self.records.put(rec, release=holder)
            if old is not None:
                self.blobs.remove_unlisted(self.records.kept_blobs())
        except BaseException:
            self._stop.set()
            rollback(self.store, created, retained, holder, "pull")
            for path, _ in kept:
                if path.parent == self.blobs.tmp:
                    path.unlink(missing_ok=True)
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            self.events.end()
        present = len(m.layers) - len(todo)
        log.info("pull: %s -> %s, %d of %d layers present", self.ref, self.name, present, len(m.layers))
        return PullResult(rec, len(m.layers), present, self.events.bytes)

    def _fetch_order(self, todo: list[int], chains: list[str]) -> list[int]:
        """The layers the record reads from, in the order it first read them, then the others."""
        first = [i for i in layer_order(self.record, chains) if i in todo]
        return first + [i for i in todo if i not in first]

    def _retain(self, chain: str, holder: str) -> bool:
        try:
            self.store.retain(chain, holder)
        except NotFound:  # removed meanwhile (gc): fetch it
            return False
        return True

    def _download(self, src: RegistrySource, i: int, d: mf.Descriptor, dl: Download) -> Path:
        """Blob i into downloads/<hex> (verified), readable through `dl` while it arrives; another
        pull fetching the same blob is waited for."""
        final = self.downloads / hex_of(d.digest)
        lock: FileLock | None = None
        try:
            lock = FileLock(self.downloads / f"{final.name}.lock")
            if final.exists():
                self.events.advance(i, d.size)
                dl.complete(final, rename=False, size=d.size)
                return final
            self.events.state(i, "downloading")

            def progress(n: int) -> None:
                if self._stop.is_set():
                    raise _Cancelled()
                self.events.advance(i, n)
                dl.grow(n)

            src.download(d, dl.path, progress)
            dl.complete(final)
            self.events.state(i, "downloaded")
            return final
        except BaseException as e:
            dl.fail(e)
            raise
        finally:
            if lock is not None:
                lock.close()

    def _import(self, src: ImageSource, m: mf.Manifest, i: int, fetch: "tuple[Future[Path], Download] | None",
                parent: str | None, comp: str, holder: str, kept: list[tuple[Path, str]]) -> Any:
        d = m.layers[i]
        if fetch is not None:
            fut, dl = fetch
            self.events.state(i, "importing")
            reader = FollowingReader(dl, f"layer {i} ({d.digest})")
            try:
                info = self.store.import_tar(reader, parent, retain=holder)  # type: ignore[arg-type]
            except InvalidInput:
                # damaged content: if the download proves the blob is not what its digest says, that is the cause
                err = fut.exception()
                if isinstance(err, IntegrityError):
                    raise err from None
                raise
            finally:
                reader.close()
            path = fut.result()
            if comp != "none":
                kept.append((path, d.digest))
            else:
                path.unlink(missing_ok=True)
            return info
        self.events.state(i, "importing")
        tee: BinaryIO | None = None
        tee_path = self.blobs.temp_path("pull-")
        if comp != "none" and not self.blobs.has(d.digest):
            tee = open(tee_path, "wb")
        try:
            with src.open_blob(d) as f:
                reader = VerifyingReader(f, d.digest, d.size, f"layer {i}", tee,
                                         lambda n: self.events.advance(i, n))
                try:
                    info = self.store.import_tar(reader, parent, retain=holder)  # type: ignore[arg-type]
                except InvalidInput:
                    reader.blame()
                    raise
        except BaseException:
            if tee is not None:
                tee.close()
                tee_path.unlink(missing_ok=True)
            raise
        if tee is not None:
            tee.close()
            kept.append((tee_path, d.digest))
        return info

    def _drop_stale_downloads(self) -> None:
        limit = time.time() - STALE_DOWNLOAD
        for p in self.downloads.iterdir():
            if p.suffix == ".lock":
                continue
            try:
                if p.stat().st_mtime < limit and not is_locked(self.downloads / f"{p.stem}.lock"):
                    p.unlink()
            except FileNotFoundError:
                pass


def rollback(store: "LayerStore", created: list[str], retained: list[str], holder: str, what: str) -> None:
    """Undo what a failed pull (or optimize) did to the store: its retains are dropped, its new
    layers go."""
    for chain in retained:
        try:
            store.release(chain, holder)
        except NotFound:
            pass
    for chain in reversed(created):
        try:
            store.remove(chain)
        except (InUse, NotFound):
            pass  # someone else uses that layer now: it stays
        except FusesnapError as e:
            log.warning("%s: could not remove %s after the failure: %s", what, chain, e)


def pull(store: "LayerStore", ref: ImageRef, **kw: Any) -> PullResult:
    return Puller(store, ref, **kw).run()
