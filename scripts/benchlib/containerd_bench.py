"""containerd rows: fusesnap as a proxy snapshotter beside containerd's own overlayfs and native.

One containerd with a [proxy_plugins] entry for a `fusesnap serve`, both
started here under a temp dir (the harness the client tests use,
tests/clients/containerd_env.py), and an image built offline. Measured, with
the snapshotters alternating inside each repetition:

- `ctr run --rm IMG true`, whole command (prepare, mount, runc, unmount, remove),
  also through two references (proxyfloor.py): the same daemon answering
  containers with a kernel overlay (`proxy-floor`: the proxy's own cost) or
  with a fuse-overlayfs it starts per container (`proxy-fuse-overlayfs`: a C
  FUSE daemon in fusesnap's place);
- the same with the benchmark's two-layer rootfs as an OCI image (Debian at full
  scale, from the workload cache): `native` copies the whole image at every
  Prepare, which a 2 MB busybox image hides;
- Prepare+Mounts round trip through the gRPC API (what containerd's client pays
  per container before it mounts), p50 and p90, in both mount modes: fuse3
  (Prepare is bookkeeping; containerd starts the FUSE mount later) and bind
  (Prepare starts the snapshot's FUSE mount);
- 50 snapshots prepared and mounted at once (each through `mount.fuse3`, as
  containerd mounts them): the daemon's and the 50 mount daemons' PSS beside 50
  kernel overlay mounts (no process; the slab growth is shown for both);
- `ctr images pull` of a ~60 MB image from a registry on loopback.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "clients")]

from containerd_env import (Containerd, FusesnapServe, base_layers, fuse_daemons, missing_tools,  # noqa: E402
                            oci_archive, push_archive, store_mounts)
from registry import start_registry  # noqa: E402
from fusesnap.daemon.client import RemoteSnapshotter, perform  # noqa: E402
from fusesnap.linux import mountinfo  # noqa: E402

from .runner import log  # noqa: E402
from .sysutil import mountpoints, unmount, with_mount_servers  # noqa: E402

# fusesnap: `fusesnap serve` (bind mounts, the default); fusesnap-fuse3: `--mounts fuse3`;
# proxy-floor, proxy-fuse-overlayfs: the same daemon answering containers with a kernel overlay,
# or with a bind of a fuse-overlayfs it starts per container (proxyfloor.py)
SNAPSHOTTERS = ("fusesnap", "fusesnap-fuse3", "proxy-floor", "proxy-fuse-overlayfs", "overlayfs", "native")
FLOORS = {"proxy-floor": "overlay", "proxy-fuse-overlayfs": "fuse-overlayfs"}
IMAGE = "docker.io/fusesnap/bench:1"
ROOTFS_IMAGE = "docker.io/fusesnap/rootfs"       # :latest, the layout's ref name
ROOTFS_SNAPSHOTTERS = ("fusesnap", "overlayfs", "native")
# (pull image MB, snapshots mounted at once) per --scale; tiny is for the smoke test
SIZES = {"full": (60, 50), "tiny": (2, 5)}


def _pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _slab_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1])
    return 0


def _ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.1f} ms"


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _paired(times: dict[str, list[float]], a: str, b: str) -> str:
    """a's time over b's within each repetition (they ran side by side): the median and
    interquartile range of those ratios, which the machine's drift between
    repetitions does not widen as it does the ratio of two medians."""
    r = [x / y for x, y in zip(times[a], times[b])]
    return f"paired {statistics.median(r):.2f}x, IQR {_pct(r, 0.25):.2f}-{_pct(r, 0.75):.2f}"


class Bench:
    def __init__(self, base: Path, runs: int, scale: str, rootfs_layout: Path | None = None) -> None:
        self.base, self.runs, self.rootfs_layout = base, runs, rootfs_layout
        self.pull_mb, self.concurrent_n = SIZES.get(scale, SIZES["full"])
        self.serve = FusesnapServe(base / "store", base / "fusesnap.sock", base / "fusesnap.log")
        self.serve3 = FusesnapServe(base / "store3", base / "fusesnap3.sock", base / "fusesnap3.log", "fuse3")
        floor = str(Path(__file__).with_name("proxyfloor.py"))
        self.floors = {sn: FusesnapServe(base / f"store-{sn}", base / f"{sn}.sock", base / f"{sn}.log",
                                         command=[sys.executable, floor, how])
                       for sn, how in FLOORS.items()}
        (base / "containerd").mkdir()
        self.ctrd = Containerd(base / "containerd", self.serve.address,
                               more_snapshotters={"fusesnap-fuse3": self.serve3.address,
                                                  **{sn: f.address for sn, f in self.floors.items()}})
        self.rows: list[tuple[str, str, str]] = []

    def __enter__(self) -> "Bench":
        self.serve.start()
        self.serve3.start()
        for f in self.floors.values():
            f.start()
        self.ctrd.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # whatever a failed row left mounted here goes first: binds, kernel overlays, and the
        # fuse-overlayfs mounts of a reference (they name no store, so the sweep below misses them)
        left = (f"{self.base}/conc/", f"{self.base}/ov/", *(f"{f.address}.mounts/" for f in self.floors.values()))
        for mp in sorted((m for m in mountpoints() if m.startswith(left)), key=len, reverse=True):
            unmount(mp)
        self.ctrd.stop()
        for serve in (self.serve, self.serve3, *self.floors.values()):
            serve.stop()
            for mp in store_mounts(serve.root):
                unmount(mp)

    def ctr(self, *args: str) -> subprocess.CompletedProcess:
        return self.ctrd.ctr(*args, timeout=600)

    def timed(self, *args: str) -> float:
        t = time.perf_counter()
        self.ctr(*args)
        return time.perf_counter() - t

    def run_rows(self) -> None:
        archive = oci_archive(self.base / "img.tar", IMAGE, base_layers(), self.base)
        for sn in SNAPSHOTTERS:
            self.ctr("images", "import", f"--snapshotter={sn}", str(archive))
        self._check_floors()
        times = self.run_times(IMAGE, SNAPSHOTTERS, "b")
        f, f3, p, pf, o, n = (statistics.median(times[s]) for s in SNAPSHOTTERS)
        self.rows.append(("`ctr run --rm IMG true`",
                          ", ".join(f"{s} {_ms(times[s])}" for s in SNAPSHOTTERS),
                          f"fusesnap {f / o:.2f}x overlayfs ({_paired(times, 'fusesnap', 'overlayfs')}), "
                          f"{f / n:.2f}x native; "
                          f"fusesnap-fuse3 {f3 / o:.2f}x overlayfs; "
                          f"proxy-floor (no FUSE) {p / o:.2f}x overlayfs "
                          f"({_paired(times, 'proxy-floor', 'overlayfs')}); "
                          f"proxy-fuse-overlayfs {pf / o:.2f}x overlayfs "
                          f"({_paired(times, 'proxy-fuse-overlayfs', 'overlayfs')})"))
        if self.rootfs_layout is not None:
            self.rootfs_run()
        self.round_trips()
        self.concurrent()
        self.pull()

    def _check_floors(self) -> None:
        """Each reference daemon answers a container's snapshot (on the imported image) with
        the mount it stands for: a kernel overlay, or a bind of a fuse-overlayfs mount."""
        for sn, how in FLOORS.items():
            c = RemoteSnapshotter(self.floors[sn].address)
            try:
                parent = next(i.name for i in c.list("kind==committed"))
                got = c.prepare("floor-check", parent)
                under = mountinfo.find(got[0].source) if got[0].type == "bind" else None
                fstype = under.fstype if under is not None else None
                c.remove("floor-check")
            finally:
                c.close()
            want = ("overlay", None) if how == "overlay" else ("bind", "fuse.fuse-overlayfs")
            if (got[0].type, fstype) != want:
                raise RuntimeError(f"{sn} answered a container's snapshot with {got[0].type} "
                                   f"of {fstype}, not {want}")

    def run_times(self, image: str, snapshotters: Sequence[str], tag: str) -> dict[str, list[float]]:
        """`ctr run --rm IMAGE true` --runs times per snapshotter, alternating, each timed run
        after an untimed one of the same snapshotter: seconds per snapshotter."""
        times: dict[str, list[float]] = {sn: [] for sn in snapshotters}
        for i in range(self.runs):
            for sn in snapshotters:
                self.timed("run", "--rm", f"--snapshotter={sn}", image, f"warm-{tag}-{sn}", "true")
                times[sn].append(self.timed("run", "--rm", f"--snapshotter={sn}", image, f"{tag}{i}-{sn}", "true"))
        return times

    def rootfs_run(self) -> None:
        """`ctr run --rm` of the rootfs image, as the first row runs the small one."""
        assert self.rootfs_layout is not None
        archive = self.base / "rootfs-image.tar"
        subprocess.run(["tar", "-C", str(self.rootfs_layout), "-cf", str(archive), "."], check=True)
        blobs = self.rootfs_layout / "blobs" / "sha256"
        mb = sum(p.stat().st_size for p in blobs.iterdir()) / 1e6
        image = f"{ROOTFS_IMAGE}:latest"
        for sn in ROOTFS_SNAPSHOTTERS:
            self.ctr("images", "import", f"--snapshotter={sn}", f"--base-name={ROOTFS_IMAGE}", str(archive))
        archive.unlink()
        times = self.run_times(image, ROOTFS_SNAPSHOTTERS, "r")
        f, o, n = (statistics.median(times[s]) for s in ROOTFS_SNAPSHOTTERS)
        self.rows.append((f"`ctr run --rm` of the rootfs image ({mb:.0f} MB compressed, 2 layers) `true`",
                          ", ".join(f"{s} {_ms(times[s])}" for s in ROOTFS_SNAPSHOTTERS),
                          f"fusesnap {f / o:.2f}x overlayfs ({_paired(times, 'fusesnap', 'overlayfs')}), "
                          f"{f / n:.2f}x native"))

    def round_trips(self) -> None:
        """fuse3: back to back. bind: back to back (the ready mount processes run out after two)
        and spaced out (a ready process for each, as for containers started one at a time)."""
        reps = max(1, self.runs // 3)
        for serve, mode, gap in ((self.serve3, "fuse3", 0.0), (self.serve, "bind", 0.0),
                                 (self.serve, "bind", 0.4)):
            c = RemoteSnapshotter(serve.address)
            if "rt-base" not in {i.name for i in c.list("kind==committed")}:
                c.prepare("rt-base-work")
                c.commit("rt-base", "rt-base-work")
            rt: list[float] = []
            keys = [f"rt-{mode}-{gap}-{i}" for i in range((200 if mode == "fuse3" else 30) * reps)]
            for key in keys:
                time.sleep(gap)
                t = time.perf_counter()
                c.prepare(key, "rt-base")
                c.mounts(key)
                rt.append(time.perf_counter() - t)
            for key in keys:
                c.remove(key)
            c.close()
            how = "back to back" if not gap else f"{gap:g} s apart"
            self.rows.append((f"Prepare+Mounts round trip (gRPC), {mode} mounts, {how}",
                              f"p50 {statistics.median(rt) * 1000:.2f} ms, p90 {_pct(rt, 0.9) * 1000:.2f} ms "
                              f"({len(rt)} calls)", "target p50 <= 5 ms" + (
                                  "; includes starting the snapshot's FUSE mount" if mode == "bind" else "")))

    def concurrent(self) -> None:
        c = RemoteSnapshotter(self.serve.address)
        mps = [self.base / "conc" / str(i) for i in range(self.concurrent_n)]
        for mp in mps:
            mp.mkdir(parents=True)
        slab0 = _slab_kb()

        def one(i: int) -> None:
            perform(c.prepare(f"conc-{i}", "rt-base"), mps[i])     # the daemon's mount, bound there

        t = time.perf_counter()
        with ThreadPoolExecutor(self.concurrent_n) as ex:
            list(ex.map(one, range(self.concurrent_n)))
        took = time.perf_counter() - t
        ok = sum(1 for mp in mps if os.path.ismount(mp))
        pids = fuse_daemons(self.serve.root)
        # the mount server the daemon's mounts are forked from, and its spare, count too
        pss = _pss_kb(self.serve.proc.pid) + sum(_pss_kb(p) for p in with_mount_servers(pids))
        slab_f = _slab_kb() - slab0
        for i, mp in enumerate(mps):
            unmount(mp)
            c.remove(f"conc-{i}")
        # 50 kernel overlay mounts of containerd's overlayfs snapshots of the same image
        slab0 = _slab_kb()
        omps = []
        top = self._top_chain()
        for i in range(self.concurrent_n):
            key = f"ov-{i}"
            self.ctr("snapshots", "--snapshotter=overlayfs", "prepare", key, top)
            mp = self.base / "ov" / str(i)
            mp.mkdir(parents=True)
            cmd = self.ctr("snapshots", "--snapshotter=overlayfs", "mounts", str(mp), key).stdout.decode().split()
            subprocess.run(cmd, check=True)
            omps.append(mp)
        slab_o = _slab_kb() - slab0
        for mp in omps:
            unmount(mp)
        c.close()
        self.rows.append((f"{self.concurrent_n} snapshots prepared and mounted at once",
                          f"{ok}/{self.concurrent_n} mounted in {took:.1f} s (bind mode); daemon, mount server + "
                          f"{len(pids)} mount daemons PSS {pss / 1024:.0f} MiB "
                          f"(slab +{slab_f / 1024:.1f} MiB)",
                          f"kernel overlay: no process, slab +{slab_o / 1024:.1f} MiB"))

    def _top_chain(self) -> str:
        """The chainID of the image's top layer (its committed snapshot's name)."""
        out = self.ctr("snapshots", "--snapshotter=overlayfs", "ls").stdout.decode().splitlines()[1:]
        rows = [ln.split() for ln in out]
        names = {r[0] for r in rows if r[-1] == "Committed"}
        parents = {r[1] for r in rows if len(r) == 3 and r[-1] == "Committed"}
        tops = sorted(names - parents)
        if not tops:
            raise RuntimeError(f"no top layer in: {out}")
        return tops[0]

    def pull(self) -> None:
        reg = start_registry(self.base / "registry")
        try:
            layers = base_layers(extra_bytes=self.pull_mb * 1_000_000)
            archive = oci_archive(self.base / "pull.tar", "docker.io/fusesnap/pull:1", layers, self.base)
            push_archive(reg, archive, "fusesnap/pull:1")
            ref = f"{reg.host}/fusesnap/pull:1"
            times: dict[str, list[float]] = {"fusesnap": [], "fusesnap-fuse3": [], "overlayfs": []}
            for _ in range(max(1, self.runs // 2)):
                for sn in times:
                    times[sn].append(self.timed("images", "pull", "--plain-http", f"--snapshotter={sn}", ref))
                    self.ctr("images", "rm", "--sync", ref)
        finally:
            reg.stop()
        med = {sn: statistics.median(ts) for sn, ts in times.items()}
        self.rows.append((f"`ctr images pull` of a {self.pull_mb} MB image (loopback registry)",
                          ", ".join(f"{sn} {v:.2f} s" for sn, v in med.items()),
                          f"fusesnap {med['fusesnap'] / med['overlayfs']:.2f}x overlayfs"))


def run(runs: int, scale: str = "full", rootfs_layout: Path | None = None) -> int:
    """Measure and print the containerd table; 1 if containerd cannot run here.
    rootfs_layout: the rootfs as an OCI layout (its row is left out without one)."""
    why = missing_tools()
    if why:
        print(f"bench: error: containerd rows: {why}", file=sys.stderr)
        return 1
    base = Path(tempfile.mkdtemp(prefix="fusesnap-bench-ctrd-", dir="/var/tmp"))
    try:
        with Bench(base, runs, scale, rootfs_layout) as b:
            log("containerd rows: ctr run, Prepare+Mounts, concurrent mounts, pull")
            b.run_rows()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\ncontainerd rows (medians of {runs} runs, snapshotters alternating):\n")
    print("| row | result | ratio / target |\n| --- | --- | --- |")
    for name, result, ratio in b.rows:
        print(f"| {name} | {result} | {ratio} |")
    return 0
