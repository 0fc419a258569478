"""Real containerd, registry and `fusesnap serve` processes for the client tests, and an offline image.

Every process gets its own temp dirs, sockets and ports, so several test runs
(and other containerd instances on the machine) never meet.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from helpers import script, wait_for
from registry import Registry
from tarbuild import TarBuilder

BUSYBOX = "/bin/busybox"
APPLETS = ["sh", "ls", "cat", "echo", "rm", "mkdir", "test", "true", "stat", "sync", "wc", "head", "find", "sleep"]


def missing_tools() -> str | None:
    """Why containerd cannot run here, or None."""
    if os.geteuid() != 0:
        return "containerd tests run containerd as root"
    for tool in ("containerd", "ctr", "runc", "mount.fuse3", "skopeo", "docker-registry"):
        if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
            return f"{tool} is not installed (scripts/setup installs it)"
    if not os.path.exists(BUSYBOX):
        return f"{BUSYBOX} is missing (busybox-static)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None



# -- an image built offline --------------------------------------------------------------------------

Member = tuple[str, str, bytes | str | None, int]      # (name, kind: file|dir|symlink|link, data/target, mode)


def layer_tar(members: list[Member]) -> bytes:
    tb = TarBuilder()
    for name, kind, data, mode in members:
        if kind == "dir":
            tb.add(name, mode=mode)
        elif kind in ("symlink", "link"):
            tb.add(name, mode=mode, kind=tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE, link=str(data))
        else:
            tb.add(name, data if isinstance(data, bytes) else Path(str(data)).read_bytes(), mode=mode)
    return tb.data()


def base_layers(extra_bytes: int = 0) -> list[list[Member]]:
    """busybox + a few files; a second layer deletes a file and a directory and makes one opaque;
    a third overwrites a base file and adds a hard link. extra_bytes adds an incompressible file."""
    bb = Path(BUSYBOX).read_bytes()
    l1: list[Member] = [("bin", "dir", None, 0o755), ("bin/busybox", "file", bb, 0o755)]
    l1 += [(f"bin/{a}", "symlink", "busybox", 0o777) for a in APPLETS]
    l1 += [("etc", "dir", None, 0o755), ("etc/base-file", "file", b"base\n", 0o644),
           ("etc/to-delete", "file", b"doomed\n", 0o644), ("deldir", "dir", None, 0o755),
           ("deldir/inner", "file", b"inner\n", 0o644), ("opq", "dir", None, 0o755),
           ("opq/old-a", "file", b"a\n", 0o644), ("opq/old-b", "file", b"b\n", 0o644),
           ("tmp", "dir", None, 0o1777)]
    if extra_bytes:
        l1 += [("blob", "dir", None, 0o755), ("blob/random", "file", os.urandom(extra_bytes), 0o644)]
    l2: list[Member] = [("etc", "dir", None, 0o755), ("etc/.wh.to-delete", "file", b"", 0o644),
                        (".wh.deldir", "file", b"", 0o644), ("opq", "dir", None, 0o755),
                        ("opq/.wh..wh..opq", "file", b"", 0o644), ("opq/new-c", "file", b"c\n", 0o644)]
    l3: list[Member] = [("etc", "dir", None, 0o755), ("etc/base-file", "file", b"changed in layer 3\n", 0o644),
                        ("etc/hard", "link", "etc/base-file", 0o644)]
    return [l1, l2, l3]


def _blob(blobs: Path, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest[7:]).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def oci_archive(dest: Path, name: str, layers: list[list[Member]], work: Path) -> Path:
    """An OCI image layout tar (what `ctr images import` and `skopeo copy oci-archive:` read).
    Odd layers are gzip-compressed, even ones plain, so both media types go through."""
    lay = work / f"layout-{os.getpid()}-{time.monotonic_ns()}"
    blobs = lay / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    descs, diff_ids = [], []
    for i, members in enumerate(layers):
        raw = layer_tar(members)
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        if i % 2 == 0:
            data, mt = gzip.compress(raw, mtime=0), "application/vnd.oci.image.layer.v1.tar+gzip"
        else:
            data, mt = raw, "application/vnd.oci.image.layer.v1.tar"
        descs.append({"mediaType": mt, **_blob(blobs, data)})
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
              "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]}
    cdesc = {"mediaType": "application/vnd.oci.image.config.v1+json",
             **_blob(blobs, json.dumps(config, sort_keys=True).encode())}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cdesc, "layers": descs}
    mdesc = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             **_blob(blobs, json.dumps(manifest, sort_keys=True).encode()),
             "platform": {"architecture": "amd64", "os": "linux"},
             "annotations": {"io.containerd.image.name": name,
                             "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}}
    (lay / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    (lay / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    with tarfile.open(dest, "w") as tf:
        for p in ("oci-layout", "index.json", "blobs"):
            tf.add(lay / p, arcname=p)
    shutil.rmtree(lay)
    return dest


# -- processes ---------------------------------------------------------------------------------------


def tool_path() -> str:
    """PATH for containerd and its shims: the venv's `fusesnap` first (mount.fuse3 runs it)."""
    return f"{Path(script('fusesnap')).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class FusesnapServe:
    root: Path
    address: Path
    log: Path
    mounts: str = "bind"
    proc: subprocess.Popen | None = None
    command: list[str] | None = None    # what runs `fusesnap`'s CLI (the console script if None)

    def start(self) -> None:
        self.address.unlink(missing_ok=True)
        self.proc = subprocess.Popen([*(self.command or [script("fusesnap")]), "--root", str(self.root), "-vv", "serve",
                                      "--address", str(self.address), "--mounts", self.mounts],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),
                                     start_new_session=True)
        wait_for(lambda: self.address.exists(), 30, "fusesnap serve socket", self.proc, self.log)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        rc = self.proc.wait(60)
        self.proc = None
        return rc


@dataclass
class Containerd:
    base: Path
    snapshotter_socket: Path
    proc: subprocess.Popen | None = None
    more_snapshotters: dict[str, Path] | None = None    # further proxy plugins: name -> socket
    # runc keeps container state under /run/containerd/runc/<namespace>/<id> whatever containerd's
    # own dirs are: a namespace of this instance's own keeps ids apart from other containerds
    namespace: str = field(default_factory=lambda: f"fusesnap-{uuid.uuid4().hex[:8]}")

    @property
    def address(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def log(self) -> Path:
        return self.base / "containerd.log"

    def write_config(self) -> Path:
        cfg = self.base / "config.toml"
        cfg.write_text(f"""version = 2
root = "{self.base}/root"
state = "{self.base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{self.address}.ttrpc"
[debug]
  address = "{self.base}/debug.sock"
  level = "info"
[metrics]
  address = ""
[proxy_plugins.fusesnap]
  type = "snapshot"
  address = "{self.snapshotter_socket}"
""" + "".join(f'[proxy_plugins."{name}"]\n  type = "snapshot"\n  address = "{sock}"\n'
                      for name, sock in (self.more_snapshotters or {}).items()))
        return cfg

    def start(self) -> None:
        cfg = self.write_config()
        env = {"PATH": tool_path(), "HOME": str(self.base), "LANG": "C.UTF-8"}
        self.proc = subprocess.Popen(["containerd", "--config", str(cfg)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"),
                                     start_new_session=True)
        wait_for(lambda: self.ctr("version", check=False).returncode == 0, 60, "containerd start",
                 self.proc, self.log)

    def ctr(self, *args: str, check: bool = True, namespace: str | None = None, timeout: float = 180,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        ns = namespace or self.namespace
        r = subprocess.run(["ctr", "--address", str(self.address), "--namespace", ns, *args],
                           capture_output=True, timeout=timeout, env={"PATH": tool_path()}, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({r.returncode}): "
                                 f"{r.stderr.decode(errors='replace')[-2000:]}")
        return r

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def push_archive(reg: Registry, archive: Path, ref: str) -> None:
    """Put an OCI archive into the registry with skopeo."""
    r = subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci-archive:{archive}",
                        f"docker://{reg.host}/{ref}"], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")


def store_mounts(root: Path) -> list[str]:
    """Mount points of FUSE mounts whose source names this store (fsname fusesnap:<tag>:<id>)."""
    from fusesnap.snapshots.mounting import store_tag

    tag = f"fusesnap:{store_tag(root)}:"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = right.split()
            if len(fields) >= 2 and fields[1].startswith(tag):
                out.append(left.split()[4])
    return out


def fuse_daemons(root: Path) -> list[int]:
    """Pids of the FUSE daemons serving mounts of the store at root (they hold /dev/fuse
    and name the store on their command line)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.fsencode(str(root)) not in Path(f"/proc/{d}/cmdline").read_bytes():
                continue
            if any(os.readlink(f"/proc/{d}/fd/{fd}") == "/dev/fuse" for fd in os.listdir(f"/proc/{d}/fd")):
                out.append(int(d))
        except OSError:
            continue
    return out
