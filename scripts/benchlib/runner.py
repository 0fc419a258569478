"""Run the selected workloads on the selected targets: same lowers, one run, targets
alternating within every repetition, medians at the end."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .build import Workset
from .profile import Recorder
from .sysutil import BenchError, abort_fuse, call_with_timeout, drop_caches, rmtree
from .startup_bench import MOUNTS, pss_per_mount
from .targets import Mounted, Target
from .workloads import POST_CHECKS, Ctx, Workload, walk


@dataclass
class Cell:
    """All runs of one workload on one target."""

    runs: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.runs) if self.runs and self.error is None else None


@dataclass
class Options:
    runs: int
    drop: bool  # really drop caches for cold steps
    timeout: float
    scratch: Path
    profile_dir: Path | None = None  # py-spy one extra run per fusesnap target into here
    pyspy: str | None = None


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class Runner:
    def __init__(self, ws: Workset, targets: list[Target], opts: Options, expect: dict[str, int]) -> None:
        self.ws = ws
        self.targets = targets
        self.opts = opts
        self.expect = expect
        self.results: dict[str, dict[str, Cell]] = {}
        self.live: list[tuple[Target, Mounted]] = []
        self.n = 0

    def _scratch(self, target: Target, tag: str) -> Path:
        self.n += 1
        return self.opts.scratch / f"{self.n:04d}-{target.name}-{tag}"

    def _mount(self, t: Target, stack: str, writable: bool, tag: str, probe: str | None = None) -> Mounted:
        m = t.mount(self.ws.stacks[stack], self._scratch(t, tag), writable, probe)
        self.live.append((t, m))
        return m

    def _unmount(self, t: Target, m: Mounted) -> None:
        try:
            t.unmount(m)
        except BenchError as e:
            log(f"{t.name}: unmount {m.mountpoint}: {e}")
        finally:
            if (t, m) in self.live:
                self.live.remove((t, m))

    def _order(self, rep: int) -> list[Target]:
        """Every repetition visits all targets, starting one further each time."""
        k = rep % len(self.targets)
        return self.targets[k:] + self.targets[:k]

    def _timed(self, w: Workload, c: Ctx) -> float:
        def body() -> float:
            drop_caches(w.cold and self.opts.drop)
            t0 = time.perf_counter()
            v = w.step(c)  # type: ignore[misc]
            dt = time.perf_counter() - t0
            return v if w.timed_inside else dt

        v = call_with_timeout(body, self.opts.timeout, lambda: abort_fuse(c.m.conn))
        if w.name in POST_CHECKS:
            POST_CHECKS[w.name](c)
        return v

    def run(self, workloads: list[Workload]) -> dict[str, dict[str, Cell]]:
        for w in workloads:
            self.results[w.name] = {t.name: Cell() for t in self.targets}
            for t in self.targets:
                why = t.unavailable() or (w.applies(t) if w.applies else None)
                if why:
                    self.results[w.name][t.name].error = why
        try:
            # read-only workloads share one mount per (stack, target)
            ro_stacks: list[str] = []
            for w in workloads:
                if w.kind == "ro" and w.stack not in ro_stacks:
                    ro_stacks.append(w.stack)
            for stack in ro_stacks:
                self._run_ro(stack, [w for w in workloads if w.kind == "ro" and w.stack == stack])
            for w in workloads:
                if w.kind in ("rw", "tool"):
                    self._run_fresh(w)
                elif w.kind == "mount":
                    self._run_mount(w)
                elif w.kind == "memory":
                    self._run_memory(w)
        finally:
            for t, m in list(self.live):
                self._unmount(t, m)
            for finish in dict.fromkeys(w.finish for w in workloads if w.finish):
                finish()
            for t in self.targets:
                t.cleanup()
        return self.results

    def _active(self, w: Workload) -> list[Target]:
        return [t for t in self.targets if self.results[w.name][t.name].error is None]

    def _fail(self, w: Workload, t: Target, e: Exception) -> None:
        msg = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
        self.results[w.name][t.name].error = msg
        log(f"{w.name} on {t.name}: n/a: {msg}")

    def _run_ro(self, stack: str, ws: list[Workload]) -> None:
        mounts: dict[str, Mounted] = {}
        for t in self.targets:
            if all(self.results[w.name][t.name].error for w in ws):
                continue
            try:
                mounts[t.name] = self._mount(t, stack, False, stack)
            except Exception as e:  # noqa: BLE001 - any failure becomes n/a
                for w in ws:
                    if self.results[w.name][t.name].error is None:
                        self._fail(w, t, BenchError(f"mount failed: {e}"))
        try:
            for w in ws:
                log(f"{w.name} ({stack}): {self.opts.runs} runs")
                if not w.cold:  # warm-up, untimed
                    for t in self._active(w):
                        self._one(w, t, mounts[t.name], record=False)
                for rep in range(self.opts.runs):
                    for t in self._order(rep):
                        if self.results[w.name][t.name].error is None:
                            self._one(w, t, mounts[t.name])
                for t in self._profiled(w):
                    with self._recorder(w, t, mounts[t.name]):
                        self._one(w, t, mounts[t.name], record=False)
        finally:
            for t in self.targets:
                if t.name in mounts:
                    self._unmount(t, mounts[t.name])

    def _profiled(self, w: Workload) -> list[Target]:
        if self.opts.profile_dir is None or not self.opts.pyspy:
            return []
        return [t for t in self._active(w) if t.name.startswith("fusesnap")]

    def _recorder(self, w: Workload, t: Target, m: Mounted) -> Recorder:
        if m.pid is None:
            raise BenchError("daemon process not found")
        assert self.opts.profile_dir is not None and self.opts.pyspy is not None
        self.opts.profile_dir.mkdir(parents=True, exist_ok=True)
        return Recorder(self.opts.pyspy, m.pid, self.opts.profile_dir / f"{w.name}--{t.name}.txt")

    def _one(self, w: Workload, t: Target, m: Mounted, record: bool = True) -> None:
        try:
            v = self._timed(w, Ctx(m, t, self.ws, m.scratch, self.expect))
        except Exception as e:  # noqa: BLE001
            self._fail(w, t, e)
            return
        if record:
            self.results[w.name][t.name].runs.append(v)

    def _run_fresh(self, w: Workload) -> None:
        """Writable workloads get a fresh mount (empty upper) for every run; tool
        workloads a fresh scratch dir."""
        log(f"{w.name} ({w.stack}): {self.opts.runs} runs")
        for rep in range(self.opts.runs):
            for t in self._order(rep):
                if self.results[w.name][t.name].error is None:
                    self._fresh_once(w, t)
        for t in self._profiled(w):
            if w.kind == "rw":
                self._fresh_once(w, t, profile=True)

    def _fresh_once(self, w: Workload, t: Target, profile: bool = False) -> None:
        scratch = self._scratch(t, w.name)
        m: Mounted | None = None
        try:
            if w.kind == "rw":
                try:
                    m = self._mount(t, w.stack, w.writable, w.name)
                except Exception as e:  # noqa: BLE001
                    raise BenchError(f"mount failed: {e}") from e
            else:
                scratch.mkdir(parents=True)
                m = Mounted(root=scratch, scratch=scratch)
            c = Ctx(m, t, self.ws, m.scratch, self.expect)
            if w.setup:
                w.setup(c)
            if profile:
                with self._recorder(w, t, m):
                    self._timed(w, c)
            else:
                self.results[w.name][t.name].runs.append(self._timed(w, c))
        except Exception as e:  # noqa: BLE001
            if profile:
                log(f"profiling {w.name} on {t.name}: {e}")
            else:
                self._fail(w, t, e)
        finally:
            if m is not None and w.kind == "rw":
                self._unmount(t, m)
            rmtree(scratch)

    def _run_mount(self, w: Workload) -> None:
        """Time of the mount command alone, from its start until it returns with the mount
        live (imports and `fusesnap prepare` happen before and are not counted); with
        w.probe, until a stat of that path in the new mount was answered."""
        log(f"{w.name} ({w.stack}): {self.opts.runs} runs")
        for rep in range(self.opts.runs):
            for t in self._order(rep):
                if self.results[w.name][t.name].error is not None:
                    continue
                m: Mounted | None = None
                try:
                    try:
                        m = call_with_timeout(lambda: self._mount(t, w.stack, True, w.name, w.probe),
                                              self.opts.timeout, lambda: None)
                    except Exception as e:  # noqa: BLE001
                        raise BenchError(f"mount failed: {e}") from e
                    seconds = m.first_stat_seconds if w.probe else m.mount_seconds
                    if seconds is None:
                        raise BenchError("target did not time its mount")
                    self.results[w.name][t.name].runs.append(seconds)
                except Exception as e:  # noqa: BLE001
                    self._fail(w, t, e)
                finally:
                    if m is not None:
                        self._unmount(t, m)

    def _run_memory(self, w: Workload) -> None:
        """Memory with many mounts alive: MOUNTS mounts of w.stack per target, each
        walked, then what startup_bench.pss_per_mount makes of their processes."""
        log(f"{w.name} ({w.stack}): {MOUNTS} mounts per target")
        for t in self._active(w):
            mounts: list[Mounted] = []
            try:
                for i in range(MOUNTS):
                    m = self._mount(t, w.stack, True, f"{w.name}-{i}")
                    mounts.append(m)
                    walk(m.root)
                self.results[w.name][t.name].runs.append(pss_per_mount([m.pid for m in mounts]))
            except Exception as e:  # noqa: BLE001
                self._fail(w, t, e)
            finally:
                for m in mounts:
                    self._unmount(t, m)
