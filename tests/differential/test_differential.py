"""Differential test: seeded random ops on kernel overlayfs vs fusesnap-overlay (500 seeds).

Each batch mounts one kernel overlayfs (redirect_dir=on,index=on) and one
fusesnap-overlay over the same logical lowers, runs 50 seeds side by side in their
own subdirectories and compares every op's result (errno included, 15% of ops as an
unprivileged uid), the trees after remounting fusesnap on the same upper (mid-way
and at the end), the final trees, inode-number stability, and finally what kernel
overlayfs shows when mounted on fusesnap's upper. The same runs with -o writeback=1 (profile
fusesnap-writeback, 100 seeds). A plain-directory oracle checks
the kernel side itself. More seeds on demand: ``python tests/differential/diffrun.py --seeds
0-9999`` (see its --help; --minimize shrinks failures into replay files).

Bugs still open are tracked strictly, so a fix makes the test fail until the entry
goes: KNOWN_FAILING (single seeds, strict xfail), OPEN_BUGS (minimized cases in
tests/differential/diffcases, strict xfail) and OPEN_KINDS (a failure kind too common to list
by seed: filtered out, and test_open_failure_kinds_still_seen fails once it stops
occurring). Each fixed bug keeps its minimized case in tests/differential/diffcases,
named after what went wrong, as a regression test.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import difflowers
import diffops
import diffrun
import difftree
from difflowers import T_MIN

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="kernel overlayfs mounts need root")

# ~40 s on a tmpfs; plain directories on a loaded disk are ~5x slower (kernels before
# 6.6 have no user xattrs on tmpfs), so fewer seeds there to stay near two minutes
CI_SEEDS = range(0, 500) if diffrun.tmpfs_usable() else range(0, 200)
BATCH = 50
# seed -> bug (what goes wrong); strict xfail, run alone
KNOWN_FAILING: dict[int, str] = {}


# Minimized failing cases found by this test (lowers and ops spelled out, so they keep
# testing the same thing whatever the generators do later), named after what went
# wrong. Cases of bugs still open run as strict xfails.
CASES_DIR = Path(__file__).parent / "diffcases"
OPEN_BUGS: dict[str, str] = {}


def _load_case(path: Path, seed: int | None = None) -> diffrun.Case:
    with open(path) as f:
        case = diffrun.case_from_json(json.load(f))
    if seed is not None:
        case.seed = seed  # only names the seed's directory: ops are explicit
    return case


def _case_params() -> list:
    out = []
    for p in sorted(CASES_DIR.glob("*.json")):
        bug = p.stem.split("-", 1)[0]
        marks = [pytest.mark.xfail(strict=True, reason=OPEN_BUGS[bug])] if bug in OPEN_BUGS else []
        out.append(pytest.param(p, marks=marks, id=p.stem))
    return out


@pytest.fixture(autouse=True)
def _umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _report(outs: list[diffrun.Outcome]) -> str:
    bad = [o for o in outs if o.failed]
    lines = [f"{len(bad)} of {len(outs)} seeds differ from kernel overlayfs: {[o.seed for o in bad]}"]
    for o in bad[:15]:
        lines.append(f"seed {o.seed}: " + "\n    ".join(o.failures[:4]))
    lines.append("replay/minimize: python tests/diffrun.py --seeds N --minimize")
    return "\n".join(lines)


def _batches() -> list[list[int]]:
    seeds = [s for s in CI_SEEDS if s not in KNOWN_FAILING]
    return [seeds[i:i + BATCH] for i in range(0, len(seeds), BATCH)]


# Failure kinds (diffrun.signature) of bugs still open that hit too many seeds to list
# them one by one: filtered out of the seed batches; test_open_failure_kinds_still_seen
# fails once a kind stops showing up (the bug got fixed: remove it here).
OPEN_KINDS: dict[str, str] = {}
_seen_open_kinds: set[str] = set()
_batches_run: list[int] = []


@pytest.mark.parametrize("seeds", _batches(), ids=lambda s: f"seeds{s[0]}-{s[-1]}")
def test_fusesnap_matches_kernel_overlayfs(seeds, shared_tmp):
    outs = diffrun.run_seeds(seeds, diffrun.PROFILES["fusesnap"], batch_size=BATCH, parent=shared_tmp)
    assert len(outs) == len(seeds)
    for o in outs:
        kinds = {diffrun.signature(f) for f in o.failures}
        _seen_open_kinds.update(kinds & set(OPEN_KINDS))
        o.failures = [f for f in o.failures if diffrun.signature(f) not in OPEN_KINDS]
    _batches_run.append(seeds[0])
    if any(o.failed for o in outs):
        pytest.fail(_report(outs), pytrace=False)


# -o writeback=1 (the kernel's writeback cache): fewer seeds, the same strictness
WRITEBACK_SEEDS = range(0, 100)


@pytest.mark.parametrize("seeds", [list(WRITEBACK_SEEDS[i:i + BATCH]) for i in range(0, len(WRITEBACK_SEEDS), BATCH)],
                         ids=lambda s: f"seeds{s[0]}-{s[-1]}")
def test_fusesnap_with_writeback_cache_matches_kernel_overlayfs(seeds, shared_tmp):
    outs = diffrun.run_seeds(seeds, diffrun.PROFILES["fusesnap-writeback"], batch_size=BATCH, parent=shared_tmp)
    assert len(outs) == len(seeds)
    if any(o.failed for o in outs):
        pytest.fail(_report(outs), pytrace=False)


def test_open_failure_kinds_still_seen():
    """Strict counterpart of OPEN_KINDS (runs after the batches)."""
    if len(_batches_run) < len(_batches()):
        pytest.skip("needs all seed batches in the same session")
    fixed = set(OPEN_KINDS) - _seen_open_kinds
    assert not fixed, f"no longer seen, remove from OPEN_KINDS: {sorted(fixed)}"


@pytest.mark.parametrize(
    "seed",
    [pytest.param(s, marks=pytest.mark.xfail(strict=True, reason=bug)) for s, bug in sorted(KNOWN_FAILING.items())],
)
def test_known_failing_seed(seed, shared_tmp):
    outs = diffrun.run_seeds([seed], diffrun.PROFILES["fusesnap"], parent=shared_tmp)
    if outs[0].failed:
        pytest.fail(_report(outs), pytrace=False)


@pytest.mark.parametrize("path", _case_params())
def test_minimized_case(path, shared_tmp):
    case = _load_case(path)
    out = diffrun.run_batch([case], diffrun.PROFILES["fusesnap"], parent=shared_tmp)[0]
    assert not out.oracle_notes, out.oracle_notes
    bug = path.stem.split("-", 1)[0]
    out.failures = [f for f in out.failures if OPEN_KINDS.get(diffrun.signature(f), bug).split(":")[0] == bug]
    if out.failed:
        pytest.fail(diffrun.format_case(case, out), pytrace=False)


def test_harness_minimized_cases_hold_on_kernel(shared_tmp):
    """The saved cases are valid: kernel against kernel agrees and the oracle agrees."""
    cases = [_load_case(p, seed=i) for i, p in enumerate(sorted(CASES_DIR.glob("*.json")))]
    assert cases
    outs = diffrun.run_batch(cases, diffrun.PROFILES["kernel"], parent=shared_tmp)
    for case, out in zip(cases, outs):
        assert not out.failed and not out.oracle_notes, diffrun.format_case(case, out)


def test_harness_batching_is_faithful(shared_tmp):
    """Seeds side by side in one mount pair behave exactly as each alone in its own
    (same ops, same per-op results, same verdict): batching only saves mount time."""
    seeds = [3, 4, 5, 6]
    prof = diffrun.PROFILES["fusesnap"]
    together = diffrun.run_seeds(seeds, prof, batch_size=len(seeds), parent=shared_tmp)
    alone = diffrun.run_seeds(seeds, prof, batch_size=1, parent=shared_tmp)
    for a, b in zip(alone, together):
        assert (a.ops, a.results, a.failures) == (b.ops, b.results, b.failures), a.seed
    assert sum(len(o.ops) for o in alone) > 100


def test_harness_kernel_against_itself_and_plain_oracle(shared_tmp):
    """No false alarms: kernel vs kernel never differs, and the plain-directory oracle
    (the merged lowers copied into a plain dir) agrees with kernel overlayfs op by op."""
    outs = diffrun.run_seeds(list(range(0, 100)), diffrun.PROFILES["kernel"], parent=shared_tmp)
    if any(o.failed for o in outs):
        pytest.fail(_report(outs), pytrace=False)
    notes = [f"seed {o.seed}: {n}" for o in outs for n in o.oracle_notes]
    assert not notes, "\n".join(notes[:20])
    # the ops really did things: most succeed, some fail with an errno
    results = [r[0] for o in outs for r in o.results]
    assert sum(r.startswith("ok") for r in results) > len(results) // 2
    assert {"ENOENT", "EEXIST", "ENOTEMPTY", "ENOTDIR", "EACCES", "EPERM"} <= set(results)


def test_harness_detects_tree_differences(shared_tmp):
    """Every compared property, changed behind the snapshot's back, is reported."""
    a = shared_tmp / "a"
    a.mkdir()
    (a / "f").write_bytes(b"x")
    os.link(a / "f", a / "g")
    (a / "d").mkdir()
    os.symlink("f", a / "l")
    os.setxattr(a / "f", "user.k", b"v")
    os.utime(a / "f", ns=(T_MIN, T_MIN))
    base = difftree.snapshot(str(a))
    assert difftree.compare(base, difftree.snapshot(str(a))) == []
    changes = [
        ("mode", lambda: os.chmod(a / "f", 0o4600)),
        ("uid", lambda: os.chown(a / "f", 1234, -1)),
        ("sha", lambda: (a / "f").write_bytes(b"y")),
        ("xattrs", lambda: os.setxattr(a / "f", "user.k", b"w")),
        ("mtime", lambda: os.utime(a / "f", ns=(T_MIN + 1, T_MIN + 1))),
        ("target", lambda: (os.unlink(a / "l"), os.symlink("g", a / "l"))),
        ("hard-link groups", lambda: (os.unlink(a / "g"), (a / "g").write_bytes(b"x"),
                                      os.utime(a / "g", ns=(T_MIN, T_MIN)))),
        ("only in", lambda: os.mkfifo(a / "d" / "p")),
    ]
    for what, change in changes:
        before = difftree.snapshot(str(a))
        change()
        diffs = difftree.compare(before, difftree.snapshot(str(a)))
        assert any(what in d for d in diffs), (what, diffs)
    assert difftree.snapshot(str(a)).entries["d/p"]["kind"] == "fifo"
    assert stat.S_ISFIFO(os.lstat(a / "d" / "p").st_mode)


def test_harness_detects_op_result_differences(shared_tmp):
    """An errno difference on one op is caught and named (kernel as the target, but
    the file was created only on the reference side behind the harness' back)."""
    case = diffrun.Case(1, [[{"path": "", "kind": "dir", "mode": 0o755, "uid": 0, "gid": 0, "mtime": T_MIN}]],
                        [{"op": "create", "path": "x", "mode": 0o644, "excl": False, "trunc": False, "data": None},
                         {"op": "stat", "path": "x", "follow": False}])
    with diffrun.workspace(shared_tmp) as base:
        batch = diffrun.Batch([case], diffrun.PROFILES["kernel"], base)
        batch.mount()
        try:
            troot, kroot, oroot = batch.roots(1)
            assert diffops.apply(case.ops[0], kroot) == diffops.apply(case.ops[0], oroot) == "ok"
            run = diffrun.SeedRun(batch, diffrun.Case(1, case.lowers, case.ops[1:]))
            run.run(case.ops[1:])
            out = run.out
        finally:
            batch.unmount()
    assert out.failed and "stat" in out.failures[0] and "ENOENT" in out.failures[0]


def test_harness_lowers_cover_every_notation(shared_tmp):
    """The generated lowers really contain each kind of object and each marker notation
    (the FUSE side mixes them; the kernel side only gets what the kernel reads)."""
    import difflowers

    specs = {s: difflowers.generate(s) for s in range(60)}
    kinds = {e["kind"] for spec in specs.values() for layer in spec for e in layer}
    assert kinds == {"dir", "reg", "link", "symlink", "fifo", "chr", "whiteout"}
    assert any(e.get("opaque") for spec in specs.values() for layer in spec for e in layer)
    found: dict[str, set[str]] = {}
    with diffrun.workspace(shared_tmp) as base:
        for side, notation in (("fuse", diffrun.PROFILES["fusesnap"].notation),
                               ("kernel", difflowers.KERNEL_NOTATION)):
            _scan_notations(base, side, notation, specs, found.setdefault(side, set()))
    assert found["fuse"] == {"whopq", "whfile", "chr", "trusted.overlay.opaque", "user.overlay.opaque",
                             "user.fuseoverlayfs.opaque"}
    assert found["kernel"] == {"chr", "trusted.overlay.opaque"}


def _scan_notations(base: Path, side: str, notation: dict, specs: dict, seen: set[str]) -> None:
    """Write the specs' lowers in one notation and collect which markers appear."""
    lowers = [base / side / f"l{j}" for j in range(4)]
    difflowers.write_lowers(specs, lowers, notation, side)
    for d in lowers:
        for dirpath, dirnames, filenames in os.walk(d):
            for n in filenames + dirnames:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                if n == ".wh..wh..opq":
                    seen.add("whopq")
                elif n.startswith(".wh."):
                    seen.add("whfile")
                elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    seen.add("chr")
                if stat.S_ISDIR(st.st_mode):
                    seen.update(x for x in os.listxattr(p) if x.endswith(".opaque"))
