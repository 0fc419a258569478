#!/usr/bin/env python3
"""Differential runner: the same seeded ops on kernel overlayfs and a FUSE overlay.

    python tests/differential/diffrun.py --seeds 0-999                 # run more seeds (fusesnap)
    python tests/differential/diffrun.py --seeds 0-99 --target fuse-overlayfs
    python tests/differential/diffrun.py --seeds 17 --minimize         # shrink failures, save replays
    python tests/differential/diffrun.py --replay FILE [--minimize] [-v]

Per batch of seeds (one tmpfs, one kernel overlayfs mount with redirect_dir=on,index=on,
one target mount; measured: a mount pair per seed is ~9x slower): each seed's lower
layers are written side by side (seed k lives in lowerdir_j/s<k>), in kernel notation
for the kernel and in mixed notations for the target; a plain directory holds the
merged view (the oracle). Each seed's ops run in lockstep on target, kernel and oracle
(15% of them as an unprivileged uid) and every op's result is compared, errno
included. After 60% of the ops and again at the end the target is unmounted and
remounted on the same upper: its trees must not change, and the remaining ops run on
the remounted target. Finally the trees are compared, and inode numbers the kernel kept
must have been kept by the target too. A plain-dir oracle disagreeing with the kernel
is reported separately (a harness problem, never seen so far).

Minimizing: shortest failing prefix, then greedy removal of op chunks, of whole
layers and of lower entries, keeping the failure kind (--want to pick another);
the result is saved as a JSON replay file (lowers and ops spelled out).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: helpers

import difflowers  # noqa: E402
import diffops  # noqa: E402
import difftree  # noqa: E402
from helpers import is_mounted, script, unmount, wait_mounted  # noqa: E402

DEFAULT_OPS = 40


# ---------------------------------------------------------------- targets


def _fuse_mount(cmd: list[str], mnt: Path) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    wait_mounted(mnt)


def _overlay_opts(lowers: list[Path], upper: Path, work: Path) -> str:
    return f"lowerdir={':'.join(map(str, lowers))},upperdir={upper},workdir={work}"


def mount_kernel(lowers: list[Path], upper: Path, work: Path, mnt: Path) -> None:
    opts = _overlay_opts(lowers, upper, work) + ",redirect_dir=on,index=on"
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"kernel overlay mount failed: {r.stderr.strip()}")


# FUSE mounts default to nodev,nosuid and to their owner alone; kernel overlayfs (like
# mount(8)) to dev,suid for everyone. Mount both alike so that opening a device node, or
# an operation run as another user, gives the same answer.
FUSE_OPTS = ",dev,suid,allow_other"


def mount_fuse_overlayfs(lowers: list[Path], upper: Path, work: Path, mnt: Path) -> None:
    _fuse_mount(["fuse-overlayfs", "-o", _overlay_opts(lowers, upper, work) + FUSE_OPTS, str(mnt)], mnt)


def mount_fusesnap(lowers: list[Path], upper: Path, work: Path, mnt: Path) -> None:
    _fuse_mount([script("fusesnap-overlay"), "-o", _overlay_opts(lowers, upper, work) + FUSE_OPTS, str(mnt)], mnt)


def _same_size_truncate(op: diffops.Op, root: str) -> bool:
    """truncate(2) to the current size: under the writeback cache the FUSE kernel owns a
    file's mtime and keeps it, where kernel overlayfs's upper stamps it."""
    if op["op"] != "truncate":
        return False
    try:
        return os.stat(os.path.join(root, op["path"])).st_size == op["length"]   # truncate follows links
    except OSError:
        return False


def mount_fusesnap_writeback(lowers: list[Path], upper: Path, work: Path, mnt: Path) -> None:
    _fuse_mount([script("fusesnap-overlay"), "-o", _overlay_opts(lowers, upper, work) + FUSE_OPTS + ",writeback=1",
                 str(mnt)], mnt)


def umount_any(mnt: Path) -> None:
    if is_mounted(mnt):
        unmount(mnt)


@dataclass
class Profile:
    """A target and the differences from kernel overlayfs it is allowed to show."""

    name: str
    mount: Callable[[list[Path], Path, Path, Path], None]
    notation: dict[str, tuple[str, ...]]
    # (op, target result) -> True when the target may fail this op where kernel
    # overlayfs succeeds; the op is then skipped on the kernel and the oracle too.
    allowed_error: Callable[[diffops.Op, str], bool] = lambda op, res: False
    # (op, the oracle's root) -> True when the op is outside what the target promises:
    # skipped on all sides before it runs
    skip_op: Callable[[diffops.Op, str], bool] = lambda op, root: False
    dir_mtimes: bool = True  # compare directory mtimes
    upper_interop: bool = False  # kernel overlayfs must read the target's upper the same
    why: str = ""


PROFILES: dict[str, Profile] = {
    "fusesnap": Profile(
        "fusesnap", mount_fusesnap,
        {"whiteout": difflowers.WHITEOUT_NOTATIONS, "opaque": difflowers.OPAQUE_NOTATIONS},
        upper_interop=True,
        why="strict: must behave like kernel overlayfs with redirect_dir=on,index=on",
    ),
    "fusesnap-writeback": Profile(
        "fusesnap-writeback", mount_fusesnap_writeback,
        {"whiteout": difflowers.WHITEOUT_NOTATIONS, "opaque": difflowers.OPAQUE_NOTATIONS},
        upper_interop=True,
        skip_op=_same_size_truncate,
        why="as strict as fusesnap, with the kernel's writeback cache (-o writeback=1), but for "
            "truncate(2) to the current size (the kernel keeps mtime)",
    ),
    "fuse-overlayfs": Profile(
        "fuse-overlayfs", mount_fuse_overlayfs,
        {"whiteout": difflowers.WHITEOUT_NOTATIONS, "opaque": ("trusted", "whopq", "user.fuseoverlayfs")},
        allowed_error=lambda op, res: op["op"] == "rename" and res == "EXDEV",
        dir_mtimes=False,
        why="harness check against a C implementation; may return EXDEV for renames",
    ),
    "kernel": Profile(
        "kernel", mount_kernel, difflowers.KERNEL_NOTATION,
        why="self-test of the harness: kernel against kernel must never differ",
    ),
}


# ---------------------------------------------------------------- running


@dataclass
class Case:
    seed: int
    lowers: difflowers.Spec
    ops: list[diffops.Op] | None = None  # None: generate nops ops from the seed
    nops: int = DEFAULT_OPS

    @classmethod
    def from_seed(cls, seed: int, nops: int = DEFAULT_OPS) -> "Case":
        return cls(seed, difflowers.generate(seed), None, nops)


@dataclass
class Outcome:
    seed: int
    ops: list[diffops.Op] = field(default_factory=list)
    results: list[tuple[str, str | None, str]] = field(default_factory=list)  # target, kernel, oracle
    failures: list[str] = field(default_factory=list)  # target vs reference
    oracle_notes: list[str] = field(default_factory=list)  # kernel vs plain-dir oracle
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.failures)


class Batch:
    """One kernel mount and one target mount holding several seeds side by side."""

    def __init__(self, cases: list[Case], profile: Profile, base: Path) -> None:
        self.cases, self.profile, self.base = cases, profile, base
        nl = max(len(c.lowers) for c in cases)
        self.klow = [base / "k" / f"l{j}" for j in range(nl)]
        self.tlow = [base / "t" / f"l{j}" for j in range(nl)]
        self.kdirs = [base / "k" / n for n in ("upper", "work", "mnt")]
        self.tdirs = [base / "t" / n for n in ("upper", "work", "mnt")]
        self.oracle = base / "oracle"
        for d in self.kdirs + self.tdirs + [self.oracle]:
            d.mkdir(parents=True, exist_ok=True)
        for d in (base, base / "k", base / "t"):
            os.chmod(d, 0o755)  # ops run as other users must reach the mounts
        specs = {c.seed: c.lowers for c in cases}
        difflowers.write_lowers(specs, self.klow, difflowers.KERNEL_NOTATION, "kernel")
        difflowers.write_lowers(specs, self.tlow, profile.notation, profile.name)
        for c in cases:
            difflowers.write_merged(difflowers.merge(c.lowers), self.oracle / difflowers.seed_dirname(c.seed))

    def mount(self) -> None:
        mount_kernel(self.klow, *self.kdirs)
        self.mount_target()

    def mount_target(self) -> None:
        self.profile.mount(self.tlow, *self.tdirs)

    def unmount(self) -> None:
        for mnt in (self.tdirs[2], self.kdirs[2]):
            umount_any(mnt)

    def roots(self, seed: int) -> tuple[str, str, str]:
        s = difflowers.seed_dirname(seed)
        return str(self.tdirs[2] / s), str(self.kdirs[2] / s), str(self.oracle / s)


REMOUNT: diffops.Op = {"op": "remount"}


def ino_map(root: str) -> dict[str, int]:
    """path -> st_ino of everything below root (symlinks not followed)."""
    out: dict[str, int] = {}

    def rec(d: str, rel: str) -> None:
        try:
            ents = list(os.scandir(d))
        except OSError:
            return  # the tree comparison reports unreadable dirs
        for e in ents:
            r = f"{rel}/{e.name}" if rel else e.name
            try:
                out[r] = e.stat(follow_symlinks=False).st_ino
            except OSError:
                continue  # listed but gone: the tree comparison reports that
            if e.is_dir(follow_symlinks=False):
                rec(e.path, r)

    rec(root, "")
    return out


def split_phases(ops: list[diffops.Op]) -> list[list[diffops.Op]]:
    """Explicit ops cut at their remount markers."""
    phases: list[list[diffops.Op]] = [[]]
    for op in ops:
        if op["op"] == "remount":
            phases.append([])
        else:
            phases[-1].append(op)
    return phases


class SeedRun:
    """One seed's ops applied in lockstep to target, kernel and oracle."""

    def __init__(self, batch: Batch, case: Case, check_every: bool = False) -> None:
        self.batch, self.case, self.check_every = batch, case, check_every
        self.prof = batch.profile
        self.troot, self.kroot, self.oroot = batch.roots(case.seed)
        self.out = Outcome(case.seed)
        self.gen = diffops.Generator(case.seed) if case.ops is None else None
        self.kernel_alive = True
        self.inos: tuple[dict[str, int], dict[str, int]] | None = None  # since this mount began
        self.final: difftree.Tree | None = None  # the target's tree after the last op
        self.done = False  # stops at the first op mismatch: later ops would only echo it

    def snapshot(self, root: str) -> difftree.Tree:
        return difftree.snapshot(root, self.prof.dir_mtimes)

    def ref(self) -> tuple[str, str]:
        return (self.kroot, "kernel") if self.kernel_alive else (self.oroot, "oracle")

    def check_inodes(self) -> None:
        """Inode numbers live as long as the mount: an object the kernel still shows
        with the inode number it had when this mount's ops began (so: the same object,
        even if copied up since) must keep its number on the target too."""
        if self.inos is None or self.done or not self.kernel_alive:
            return
        t0, k0 = self.inos
        t1, k1 = ino_map(self.troot), ino_map(self.kroot)
        for path in sorted(set(t0) & set(t1) & set(k0) & set(k1)):
            if k0[path] == k1[path] and t0[path] != t1[path]:
                self.out.failures.append(f"inode of {path} changed from {t0[path]} to {t1[path]} "
                                         f"(kernel kept {k0[path]})")
                self.done = True

    def run(self, phase: int | list[diffops.Op]) -> None:
        if self.inos is None and not self.done:
            self.inos = (ino_map(self.troot), ino_map(self.kroot))
        n = phase if isinstance(phase, int) else len(phase)
        for j in range(n):
            if self.done:
                return
            op = self.gen.next(self.oroot) if isinstance(phase, int) else phase[j]  # type: ignore[union-attr]
            self.step(op)

    def step(self, op: diffops.Op) -> None:
        out, prof = self.out, self.prof
        i = len(out.ops)
        out.ops.append(op)
        if prof.skip_op(op, self.oroot):
            out.results.append(("skipped", None, "skipped"))
            out.notes.append(f"op {i}: {diffops.describe(op)}: not promised by {prof.name}, skipped on all")
            return
        t = diffops.apply(op, self.troot)
        if t != "ok" and prof.allowed_error(op, t):
            out.results.append((t, None, "skipped"))
            out.notes.append(f"op {i}: {diffops.describe(op)}: {prof.name} gave {t} (allowed), skipped on all")
            return
        k = diffops.apply(op, self.kroot) if self.kernel_alive else None
        o = diffops.apply(op, self.oroot)
        out.results.append((t, k, o))
        if self.kernel_alive and k != o:
            if op["op"] == "rename" and k == "EXDEV":
                self.kernel_alive = False
                out.notes.append(f"op {i}: kernel gave EXDEV where a plain dir did not: oracle is the reference from here")
            else:
                out.oracle_notes.append(f"op {i}: {diffops.describe(op)}: kernel={k} oracle={o}")
        ref = k if self.kernel_alive else o
        ref_name = self.ref()[1]
        if t != ref:
            out.failures.append(f"op {i}: {diffops.describe(op)}: {prof.name}={t} {ref_name}={ref}")
            self.done = True
        elif self.check_every:
            diffs = difftree.compare(self.snapshot(self.ref()[0]), self.snapshot(self.troot), ref_name, prof.name)
            if diffs:
                out.failures.append(f"after op {i}: {diffops.describe(op)}: trees differ: " + "; ".join(diffs[:5]))
                self.done = True

    def remounted(self, before: difftree.Tree) -> None:
        """Record the remount in the op list and check the tree survived it."""
        self.out.ops.append(dict(REMOUNT))
        self.out.results.append(("ok", "ok", "ok"))
        self.inos = None
        diffs = difftree.compare(before, self.snapshot(self.troot), "before", "after")
        if diffs:
            self.out.failures += [f"after remount: {d}" for d in diffs]
            self.done = True

    def finish(self) -> None:
        self.check_inodes()
        if self.done:
            return
        ttree, otree = self.snapshot(self.troot), self.snapshot(self.oroot)
        self.final = ttree
        if self.kernel_alive:
            ktree = self.snapshot(self.kroot)
            self.out.oracle_notes += [f"final tree: {d}" for d in difftree.compare(ktree, otree, "kernel", "oracle")]
            self.out.failures += [f"final tree: {d}" for d in difftree.compare(ktree, ttree, "kernel", self.prof.name)]
        else:
            self.out.failures += [f"final tree: {d}" for d in difftree.compare(otree, ttree, "oracle", self.prof.name)]


def _try_tmpfs(base: Path) -> bool:
    """Mount a tmpfs on base if it can hold everything the test needs (user xattrs on
    tmpfs need Linux 6.6); plain directories on a loaded disk are several times slower."""
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4g,mode=0755", "fusesnap-diff", str(base)],
                       capture_output=True)
    if r.returncode != 0:
        return False
    probe = base / "probe"
    try:
        probe.write_bytes(b"")
        os.setxattr(probe, "user.probe", b"1")
        os.setxattr(probe, "trusted.probe", b"1")
        probe.unlink()
        return True
    except OSError:
        umount_any(base)
        return False


def tmpfs_usable() -> bool:
    """Whether batches get their fast tmpfs on this machine (root, Linux >= 6.6)."""
    if os.geteuid() != 0:
        return False
    d = Path(tempfile.mkdtemp(prefix="fusesnap-diff-probe-", dir="/var/tmp"))
    try:
        ok = _try_tmpfs(d)
        if ok:
            umount_any(d)
        return ok
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def workspace(parent: str | os.PathLike | None = None, tmpfs: bool = True) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="fusesnap-diff-", dir=parent or "/var/tmp"))
    on_tmpfs = tmpfs and _try_tmpfs(base)
    try:
        yield base
    finally:
        with open("/proc/self/mountinfo") as f:
            mps = [line.split()[4] for line in f]
        for mp in sorted((m for m in mps if m.startswith(str(base) + "/")), key=len, reverse=True):
            with contextlib.suppress(Exception):
                unmount(mp)
        if on_tmpfs:
            umount_any(base)
        shutil.rmtree(base, ignore_errors=True)


def run_batch(cases: list[Case], profile: Profile, parent: str | os.PathLike | None = None,
              persistence: bool = True, check_every: bool = False,
              reader: Profile | None = None) -> list[Outcome]:
    """Run cases side by side in one mount pair.

    Generated cases run 60% of their ops, the target is remounted (its trees must
    not change), the rest of the ops run on the remounted target, the final trees
    are compared, and a last remount must again show the same trees. Explicit op
    lists (replays) remount wherever they hold a {"op": "remount"} marker.
    """
    with workspace(parent) as base:
        batch = Batch(cases, profile, base)
        batch.mount()
        try:
            runs = [SeedRun(batch, c, check_every) for c in cases]
            plans: list[list[int | list[diffops.Op]]] = []
            for c in cases:
                if c.ops is not None:
                    plans.append(list(split_phases(c.ops)))
                elif persistence:
                    first = (c.nops * 3) // 5
                    plans.append([first, c.nops - first, 0])
                else:
                    plans.append([c.nops])
            nphases = max(len(p) for p in plans)
            for ph in range(nphases):
                if ph > 0:
                    for r in runs:
                        r.check_inodes()
                    live = [r for r in runs if not r.done]
                    before = {id(r): r.snapshot(r.troot) for r in live}
                    umount_any(batch.tdirs[2])
                    batch.mount_target()
                    for r in live:
                        r.remounted(before[id(r)])
                for r, plan in zip(runs, plans):
                    if ph < len(plan):
                        r.run(plan[ph])
                    if r.out.results and r.out.results[-1][0] == "ENOTCONN":
                        for other in runs:
                            if not other.done:
                                other.out.failures.append(f"not run: the {profile.name} mount died during seed {r.case.seed}")
                                other.done = True
            for r in runs:
                r.finish()
            if profile.upper_interop:
                check_upper_interop(batch, runs)
            if reader is not None:
                check_upper_reader(batch, runs, reader)
            return [r.out for r in runs]
        finally:
            batch.unmount()


def check_upper_reader(batch: Batch, runs: list[SeedRun], reader: Profile) -> None:
    """Another FUSE overlay mounted on the target's upper (same lowers, same notation)
    must show what the target itself shows after a fresh mount: e.g. fusesnap must read
    what fuse-overlayfs wrote, so podman can switch mount programs over its storage."""
    umount_any(batch.tdirs[2])
    batch.mount_target()
    own = {id(r): r.snapshot(r.troot) for r in runs}  # also seeds that failed: still an upper
    umount_any(batch.tdirs[2])
    work, mnt = batch.base / "r" / "work", batch.base / "r" / "mnt"
    work.mkdir(parents=True)
    mnt.mkdir(parents=True)
    reader.mount(batch.tlow, batch.tdirs[0], work, mnt)
    try:
        for r in runs:
            if id(r) not in own:
                continue
            theirs = difftree.snapshot(str(mnt / difflowers.seed_dirname(r.case.seed)), r.prof.dir_mtimes)
            diffs = difftree.compare(own[id(r)], theirs, batch.profile.name, reader.name)
            r.out.failures += [f"upper read by {reader.name}: {d}" for d in diffs]
    finally:
        umount_any(mnt)


def check_upper_interop(batch: Batch, runs: list[SeedRun]) -> None:
    """The target's upper is a plain overlay upper: kernel overlayfs mounted on it (over
    the same logical lowers in kernel notation) must show exactly the target's tree. That
    is what lets podman/containerd switch mount programs over the same storage."""
    umount_any(batch.tdirs[2])
    work, mnt = batch.base / "x" / "work", batch.base / "x" / "mnt"
    work.mkdir(parents=True)
    mnt.mkdir(parents=True)
    opts = _overlay_opts(batch.klow, batch.tdirs[0], work) + ",redirect_dir=on,index=off"
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        for run in runs:
            run.out.failures.append(f"kernel overlayfs refuses the {batch.profile.name} upper: {r.stderr.strip()}")
        return
    try:
        for run in runs:
            if run.final is None or run.done:
                continue
            again = run.snapshot(str(mnt / difflowers.seed_dirname(run.case.seed)))
            diffs = difftree.compare(run.final, again, batch.profile.name, "kernel-on-its-upper")
            run.out.failures += [f"upper read by kernel overlayfs: {d}" for d in diffs]
    finally:
        umount_any(mnt)


def run_seeds(seeds: list[int], profile: Profile, batch_size: int = 50, nops: int = DEFAULT_OPS,
              parent: str | os.PathLike | None = None, persistence: bool = True,
              progress: Callable[[list[Outcome]], None] | None = None,
              reader: Profile | None = None) -> list[Outcome]:
    outs: list[Outcome] = []
    for i in range(0, len(seeds), batch_size):
        chunk = [Case.from_seed(s, nops) for s in seeds[i:i + batch_size]]
        res = run_batch(chunk, profile, parent, persistence, reader=reader)
        outs += res
        if progress:
            progress(res)
    return outs


# ---------------------------------------------------------------- minimizing


def signature(failure: str) -> str:
    """What kind of failure a report line is, so minimizing keeps chasing the same bug:
    'op:<op>:<target result>' for an op mismatch, '<phase>:<fields>' for trees."""
    if failure.startswith("upper read by") and not failure.startswith("upper read by kernel"):
        return "upper-reader:" + signature("final tree: " + failure.split(": ", 1)[1]).split(":", 1)[1]
    if failure.startswith("upper read by kernel"):
        if "listed by readdir" in failure:
            return "upper-interop:whiteout-listed"
        return "upper-interop:" + signature("final tree: " + failure.split(": ", 1)[1]).split(":", 1)[1]
    if failure.startswith("inode of "):
        return "inode-changed"
    if failure.startswith("op "):
        head, _, results = failure.partition(": ")
        opname = results.split(" ", 1)[0]
        got = results.rsplit(" ", 2)[-2].split("=", 1)[-1] if results.count("=") >= 2 else ""
        return f"op:{opname}:{got.split(':', 1)[0]}"
    phase, _, rest = failure.partition(": ")
    if rest.startswith("hard-link groups"):
        return f"{phase}:links"
    if " only in " in rest:
        return f"{phase}:only-in"
    if rest.startswith("after op"):
        return "tree-after-op"
    fields = sorted(set(re.findall(r"(?:: |, )(kind|mode|uid|gid|mtime|size|sha|target|xattrs|rdev) \S+=", rest)))
    return f"{phase}:{'/'.join(fields) or rest[:40]}"


def _fails(case: Case, profile: Profile, persistence: bool, want: str | None = None) -> Outcome | None:
    out = run_batch([case], profile, persistence=persistence)[0]
    if not out.failed or out.oracle_notes:
        return None  # kernel and plain oracle disagree: a shrunk spec hit a kernel quirk
    if want is not None and want not in {signature(f) for f in out.failures}:
        return None
    return out


def minimize(case: Case, profile: Profile, persistence: bool = True,
             log: Callable[[str], None] = lambda s: None, want: str | None = None) -> tuple[Case, Outcome]:
    """Shortest failing prefix, then greedy removal of ops and of lower entries.

    Keeps the failure kind (signature) of the first failure, or `want` if given."""
    first = _fails(case, profile, persistence, want)
    if first is None:
        raise ValueError(f"seed {case.seed} does not fail" + (f" with {want!r}" if want else ""))
    want = want or signature(first.failures[0])
    log(f"seed {case.seed}: minimizing for failure kind {want!r}")

    def fails(c: Case) -> Outcome | None:
        return _fails(c, profile, persistence, want)

    ops = list(first.ops)
    best = first
    # an op-level mismatch ends the run at that op: the prefix is already minimal
    if not any(f.startswith("op ") for f in first.failures):
        lo, hi = 0, len(ops)  # ops[:hi] fails; find the smallest such hi
        while lo < hi:
            mid = (lo + hi) // 2
            r = fails(Case(case.seed, case.lowers, ops[:mid]))
            if r is not None:
                hi, best = mid, r
            else:
                lo = mid + 1
        ops = ops[:hi]
    else:
        ops = ops[: len(first.results)]
    log(f"seed {case.seed}: failing prefix has {len(ops)} ops")
    changed = True
    while changed:
        changed = False
        chunk = max(1, len(ops) // 4)
        while chunk >= 1:
            i = len(ops) - chunk
            while i >= 0:
                trial = ops[:i] + ops[i + chunk:]
                r = fails(Case(case.seed, case.lowers, trial))
                if r is not None:
                    ops, best, changed = trial, r, True
                i -= chunk
            chunk //= 2
    log(f"seed {case.seed}: {len(ops)} ops after removal")
    lowers = [list(layer) for layer in case.lowers]
    changed = True
    while changed:
        changed = False
        for j in reversed(range(len(lowers))):
            if len(lowers) > 1:
                r = fails(Case(case.seed, lowers[:j] + lowers[j + 1:], ops))
                if r is not None:
                    lowers, best, changed = lowers[:j] + lowers[j + 1:], r, True
                    continue
            for e in list(reversed(lowers[j])):
                layer = lowers[j]
                if not e["path"] or any(x["path"].startswith(e["path"] + "/") for x in layer):
                    continue
                if any(x["kind"] == "link" and x["target"] == e["path"] for x in layer):
                    continue
                trial = lowers[:j] + [[x for x in layer if x is not e]] + lowers[j + 1:]
                r = fails(Case(case.seed, trial, ops))
                if r is not None:
                    lowers, best, changed = trial, r, True
    n_entries = sum(len(layer) for layer in lowers)
    log(f"seed {case.seed}: {n_entries} lower entries after removal")
    return Case(case.seed, lowers, ops), best


# ---------------------------------------------------------------- reports and CLI


def case_to_json(case: Case, profile: Profile, outcome: Outcome | None) -> dict[str, Any]:
    return {
        "target": profile.name,
        "seed": case.seed,
        "lowers": case.lowers,
        "ops": case.ops if case.ops is not None else (outcome.ops if outcome else None),
        "failures": outcome.failures if outcome else [],
    }


def case_from_json(d: dict[str, Any]) -> Case:
    return Case(d["seed"], d["lowers"], d["ops"])


def format_case(case: Case, outcome: Outcome) -> str:
    """Lowers, ops with per-target results, and the failures, for humans and regression cases."""
    lines = [f"seed {case.seed}"]
    for j, layer in enumerate(case.lowers):
        lines.append(f"  lower {j} ({'top' if j == 0 else 'below'}):")
        for e in layer:
            attrs = " ".join(f"{k}={(oct(v) if k == 'mode' else v)!r}" for k, v in e.items()
                             if k not in ("path", "kind", "mtime"))
            lines.append(f"    {e['kind']:8} {e['path'] or '.'} {attrs}")
    lines.append("  ops (target | kernel | oracle):")
    for i, op in enumerate(outcome.ops):
        res = outcome.results[i] if i < len(outcome.results) else ("-", "-", "-")
        lines.append(f"    {i:3} {diffops.describe(op)}  ->  {res[0]} | {res[1]} | {res[2]}")
    for f in outcome.failures:
        lines.append(f"  FAIL {f}")
    for f in outcome.oracle_notes:
        lines.append(f"  ORACLE {f}")
    for f in outcome.notes:
        lines.append(f"  note {f}")
    return "\n".join(lines)


def parse_seeds(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out += range(int(a), int(b) + 1)
        elif part:
            out.append(int(part))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", help="e.g. 0-999 or 3,17,40-49")
    ap.add_argument("--replay", help="a JSON case saved by --minimize / --save")
    ap.add_argument("--target", default="fusesnap", choices=sorted(PROFILES))
    ap.add_argument("--read-upper-with", choices=sorted(PROFILES),
                    help="afterwards mount this one on the target's upper: it must show the same trees "
                         "(with --target fuse-overlayfs, judge by hand: fuse-overlayfs 1.10's own "
                         "remounted view of its upper is often wrong, e.g. hard links)")
    ap.add_argument("--ops", type=int, default=DEFAULT_OPS, help="ops per seed")
    ap.add_argument("--batch", type=int, default=50, help="seeds per mount pair")
    ap.add_argument("--minimize", action="store_true", help="shrink failing cases and save them")
    ap.add_argument("--want", help="minimize for this failure kind (as printed: 'final tree:gid')")
    ap.add_argument("--save", default="/var/tmp/fusesnap-diff-failures", help="where replay files go")
    ap.add_argument("--no-persist", action="store_true", help="skip the unmount/remount check")
    ap.add_argument("--no-dir-mtimes", action="store_true",
                    help="do not compare directory mtimes (to look past a known mtime bug)")
    ap.add_argument("--check-every", action="store_true", help="compare trees after every op (replay)")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("diffrun: needs root (kernel overlayfs mounts)", file=sys.stderr)
        return 2
    if bool(a.seeds) == bool(a.replay):
        print("diffrun: give exactly one of --seeds or --replay", file=sys.stderr)
        return 2
    os.umask(0o022)
    prof = PROFILES[a.target]
    if a.no_dir_mtimes:
        prof = dataclasses.replace(prof, dir_mtimes=False)
    persist = not a.no_persist
    save = Path(a.save)
    if a.replay:
        try:
            with open(a.replay) as f:
                case = case_from_json(json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"diffrun: cannot use replay file {a.replay}: {e}", file=sys.stderr)
            return 2
        out = run_batch([case], prof, persistence=persist, check_every=a.check_every)[0]
        print(format_case(case, out))
        if out.failed and a.minimize:
            small, sout = minimize(case, prof, persist, log=print, want=a.want)
            _save(save, prof, small, sout)
        return 1 if out.failed else 0
    try:
        seeds = parse_seeds(a.seeds)
    except ValueError:
        print(f"diffrun: bad --seeds {a.seeds!r} (want e.g. 0-999 or 3,17,40-49)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    done = 0

    def progress(res: list[Outcome]) -> None:
        nonlocal done
        done += len(res)
        bad = [o.seed for o in res if o.failed]
        print(f"{done}/{len(seeds)} seeds, {time.monotonic() - t0:.1f}s; failing here: {bad}", flush=True)

    reader = PROFILES[a.read_upper_with] if a.read_upper_with else None
    outs = run_seeds(seeds, prof, a.batch, a.ops, persistence=persist, progress=progress, reader=reader)
    failed = [o for o in outs if o.failed]
    noted = [o for o in outs if o.oracle_notes]
    for o in outs:
        if o.failed or o.oracle_notes or a.verbose:
            case = Case(o.seed, difflowers.generate(o.seed), o.ops)
            if a.verbose or o.failed:
                print(format_case(case, o) if a.verbose else f"seed {o.seed}: " + "\n  ".join(o.failures[:8]))
            for n in o.oracle_notes[:5]:
                print(f"seed {o.seed}: ORACLE {n}")
    print(f"{len(outs)} seeds, {len(failed)} failing: {[o.seed for o in failed]}; "
          f"{len(noted)} with kernel/oracle notes; {time.monotonic() - t0:.1f}s")
    if a.minimize:
        for o in failed:
            case = Case(o.seed, difflowers.generate(o.seed), o.ops)
            try:
                small, sout = minimize(case, prof, persist, log=print, want=a.want)
            except ValueError as e:
                print(f"seed {o.seed}: fails only next to other seeds in a batch ({e})")
                _save(save, prof, case, o)
                continue
            _save(save, prof, small, sout)
            print(format_case(small, sout))
    return 1 if failed else 0


def _save(save: Path, prof: Profile, case: Case, out: Outcome) -> None:
    save.mkdir(parents=True, exist_ok=True)
    p = save / f"{prof.name}-seed{case.seed}.json"
    with open(p, "w") as f:
        json.dump(case_to_json(case, prof, out), f, indent=1)
    print(f"saved {p}  (replay: python tests/diffrun.py --replay {p} --target {prof.name})")


if __name__ == "__main__":
    sys.exit(main())
