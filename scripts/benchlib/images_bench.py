"""Image pull and push rows: fusesnap against skopeo (+ GNU tar) through loopback registries.

The image is the rootfs workload's two layers, gzip-compressed, with a config,
in a docker-registry on 127.0.0.1 (the source); each push goes to a registry
started empty for it (so every blob is uploaded: skopeo's blob cache cannot
mount blobs from an earlier push, and fusesnap cannot mount from the source,
another host). The reference ("plain" column):
- pull: `skopeo copy docker://SRC oci:DIR`, then GNU `tar -xzf` of each layer;
- pull again: the same skopeo copy into the same layout (skopeo skips the blobs it has);
- push: `skopeo copy oci:DIR docker://DST`.
Each fusesnap step checks its result: the manifest digest it pulled or pushed,
and no layer bytes on a repeated pull, counted in the registry's access log.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .build import Workset
from .sysutil import BenchError, run
from .targets import FusesnapStore
from .workloads import Ctx, Workload, check, only_tool_targets

REPO = "bench/debian"
REGISTRY_CONFIG = """version: 0.1
log: {level: warn, accesslog: {disabled: false}}
storage: {filesystem: {rootdirectory: %s}, delete: {enabled: true}}
http: {addr: 127.0.0.1:%d}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Registry:
    """A docker-registry process with its own storage and access log."""

    def __init__(self, base: Path, name: str) -> None:
        if not shutil.which("docker-registry"):
            raise BenchError("docker-registry is not installed")
        self.dir = base / name
        self.dir.mkdir(parents=True)
        port = _free_port()
        self.host = f"127.0.0.1:{port}"
        (self.dir / "config.yml").write_text(REGISTRY_CONFIG % (self.dir / "data", port))
        self.log = self.dir / "access.log"
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.dir / "config.yml")],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2).close()
                return
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise BenchError(f"docker-registry did not start: {self.log.read_text()[-300:]}")
                time.sleep(0.05)

    def blob_gets(self, digests: list[str]) -> int:
        text = self.log.read_text(errors="replace")
        return sum(len(re.findall(rf'"GET /v2/[^ ]*/blobs/{d} ', text)) for d in digests)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class ImageBench:
    """Built once per bench run, on first use: the layout, both registries, the pushed image."""

    def __init__(self) -> None:
        self.ready = False
        self.pushes = 0

    def ensure(self, ws: Workset) -> "ImageBench":
        if self.ready:
            return self
        if not shutil.which("skopeo"):
            raise BenchError("skopeo is not installed")
        self.layout = rootfs_layout(ws.stacks["rootfs"].tars, Path(ws.root) / "image-oci")
        self.tmp = Path(tempfile.mkdtemp(prefix="fusesnap-bench-registries-"))
        atexit.register(self.close)
        self.src = _Registry(self.tmp, "src")
        self.dst: _Registry | None = None
        run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{self.layout}:latest", self.ref(self.src)],
            timeout=900)
        index = json.loads((self.layout / "index.json").read_text())
        self.manifest_digest = index["manifests"][0]["digest"]
        manifest = json.loads((self.layout / "blobs/sha256" / self.manifest_digest[7:]).read_bytes())
        self.layers = [x["digest"] for x in manifest["layers"]]
        self.layer_bytes = sum(x["size"] for x in manifest["layers"])
        self.ready = True
        return self

    @staticmethod
    def ref(reg: _Registry, repo: str = REPO) -> str:
        return f"docker://{reg.host}/{repo}:latest"

    def fresh_destination(self) -> str:
        """An empty registry for the next push (the previous one is stopped and deleted)."""
        if self.dst is not None:
            self.dst.stop()
            shutil.rmtree(self.dst.dir, ignore_errors=True)
        self.pushes += 1
        self.dst = _Registry(self.tmp, f"dst-{self.pushes}")
        return self.ref(self.dst)

    def close(self) -> None:
        for r in (getattr(self, "src", None), getattr(self, "dst", None)):
            if r is not None:
                r.stop()
        if hasattr(self, "tmp"):
            shutil.rmtree(self.tmp, ignore_errors=True)


BENCH = ImageBench()


def rootfs_layout(tars: list[str], path: Path) -> Path:
    """An OCI layout (gzip -6 -n) of the rootfs layers' tars, built once into the workload cache."""
    if (path / "index.json").exists():
        return path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    blobs = tmp / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, object]:
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return {"digest": "sha256:" + d, "size": len(data)}

    layers, diff_ids = [], []
    for tar in tars:
        with open(tar, "rb") as f:
            diff_ids.append("sha256:" + hashlib.file_digest(f, "sha256").hexdigest())
        gz = run(["gzip", "-6", "-n", "-c", tar], text=False, timeout=900).stdout
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(gz)})
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/bash"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **put(config)},
                           "layers": layers}).encode()
    m = put(manifest)
    (tmp / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (tmp / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **m,
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    os.replace(tmp, path)
    return path


def _fusesnap_pull(c: Ctx, b: ImageBench) -> tuple[float, dict]:
    assert isinstance(c.target, FusesnapStore)
    t0 = time.perf_counter()
    p = c.target.cli("pull", "--plain-http", "--quiet", "--json", b.ref(b.src), "--name", "bench",
                     root=c.scratch / "store", timeout=1800)
    dt = time.perf_counter() - t0
    res = json.loads(p.stdout)
    check(res["manifest_digest"] == b.manifest_digest, f"pulled {res['manifest_digest']}, not {b.manifest_digest}")
    return dt, res


def _skopeo_pull(c: Ctx, b: ImageBench) -> float:
    t0 = time.perf_counter()
    run(["skopeo", "copy", "-q", "--src-tls-verify=false", b.ref(b.src), f"oci:{c.scratch / 'oci'}:latest"],
        timeout=1800)
    return time.perf_counter() - t0


def s_pull(c: Ctx) -> float:
    """fusesnap: `fusesnap pull` into an empty store; plain: skopeo copy to a layout + tar -xzf of its layers."""
    b = BENCH.ensure(c.ws)
    if isinstance(c.target, FusesnapStore):
        dt, res = _fusesnap_pull(c, b)
        check(res["transferred"] == b.layer_bytes and res["present"] == 0, f"pull moved {res['transferred']} bytes")
        return dt
    dt = _skopeo_pull(c, b)
    rootfs = c.scratch / "rootfs"
    rootfs.mkdir()
    t0 = time.perf_counter()
    for d in b.layers:
        run(["tar", "--numeric-owner", "-xzf", str(c.scratch / "oci/blobs/sha256" / d[7:]), "-C", str(rootfs)],
            timeout=1800)
    return dt + time.perf_counter() - t0


def setup_pulled(c: Ctx) -> None:
    b = BENCH.ensure(c.ws)
    if isinstance(c.target, FusesnapStore):
        _fusesnap_pull(c, b)
    else:
        _skopeo_pull(c, b)


def setup_push(c: Ctx) -> None:
    setup_pulled(c)
    c.m.extra["dest"] = BENCH.fresh_destination()


def s_pull_again(c: Ctx) -> float:
    """The same pull into the store (layout) that has the image: no layer may be transferred."""
    b = BENCH.ensure(c.ws)
    before = b.src.blob_gets(b.layers)
    if isinstance(c.target, FusesnapStore):
        dt, res = _fusesnap_pull(c, b)
        check(res["transferred"] == 0, f"a repeated pull transferred {res['transferred']} layer bytes")
        check(b.src.blob_gets(b.layers) == before, "the registry served layer blobs to a repeated pull")
        return dt
    return _skopeo_pull(c, b)


def s_push(c: Ctx) -> float:
    """fusesnap: `fusesnap push` of the pulled image; plain: skopeo copy of the layout; to a fresh repository."""
    b = BENCH.ensure(c.ws)
    dest = c.m.extra["dest"]
    t0 = time.perf_counter()
    if isinstance(c.target, FusesnapStore):
        p = c.target.cli("push", "--plain-http", "--quiet", "bench", dest, root=c.scratch / "store", timeout=1800)
        dt = time.perf_counter() - t0
        check(p.stdout.strip() == b.manifest_digest, f"pushed {p.stdout.strip()}, not {b.manifest_digest}")
        return dt
    run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{c.scratch / 'oci'}:latest", dest], timeout=1800)
    return time.perf_counter() - t0


IMAGE_WORKLOADS = [
    Workload("pull", "pull the rootfs image, gzip, loopback registry (plain: skopeo copy + tar -xzf)", "base", "s",
             "tool", False, s_pull, applies=only_tool_targets, timed_inside=True),
    Workload("pull-again", "pull it again: no layer bytes (plain: skopeo copy again)", "base", "s", "tool", False,
             s_pull_again, setup=setup_pulled, applies=only_tool_targets, timed_inside=True),
    Workload("push", "push it to an empty loopback registry (plain: skopeo copy oci: docker://)", "base", "s",
             "tool", False, s_push, setup=setup_push, applies=only_tool_targets, timed_inside=True),
]


def image_titles(ws: Workset) -> dict[str, str]:
    size = ""
    layout = Path(ws.root) / "image-oci"
    if (layout / "blobs").exists():
        total = sum(p.stat().st_size for p in (layout / "blobs/sha256").iterdir())
        size = f" ({total / 1e6:.0f} MB)"
    return {w.name: w.title.replace("rootfs image", f"rootfs image{size}") for w in IMAGE_WORKLOADS}
