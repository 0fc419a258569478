"""scripts/bench.py on tiny workloads: every target mounts, every workload runs on it,
the table and the JSON come out. No timing assertions: speed is the benchmark's job."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from helpers import is_root

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "scripts" / "bench.py"
BIN = Path(sys.executable).parent
TARGETS = ["plain", "kernel", "fuse-overlayfs", "fusesnap-overlay", "fusesnap"]
# n/a by design (the workload does not apply to that target), not failures
NOT_APPLICABLE = ("no daemon", "not a layer store", "not a mount", "not a mount program")

pytestmark = pytest.mark.skipif(not is_root(), reason="building overlay layers and kernel overlayfs need root")


def bench(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench") / "cache"


@pytest.fixture(scope="module")
def tiny_run(tiny_cache: Path):
    out = tiny_cache.parent / "result.json"
    p = bench("--scale", "tiny", "--cache", str(tiny_cache), "--runs", "1", "--no-drop-caches",
              "--fusesnap-bin", str(BIN), "--timeout", "60", "--json", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    return p, json.loads(out.read_text())


def test_table_lists_every_workload_and_target(tiny_run):
    p, data = tiny_run
    header = next(line for line in p.stdout.splitlines() if line.startswith("| workload"))
    for t in TARGETS:
        assert f" {t} " in header
    assert "fusesnap / fuse-overlayfs" in header and "fuse-overlayfs / plain" in header
    names = [w["name"] for w in data["workloads"]]
    listed = [line.split()[0] for line in bench("--list").stdout.splitlines()]
    assert names == [x for x in listed if x in names] and len(names) == len(set(names)) >= 20
    for w in data["workloads"]:
        assert f"| {w['title']}" in p.stdout


@pytest.mark.parametrize("target", TARGETS)
def test_target_runs_every_workload(tiny_run, target):
    _, data = tiny_run
    failed = {}
    for w in data["workloads"]:
        cell = w["targets"][target]
        if cell["error"] in NOT_APPLICABLE:
            continue
        # a CPU-time row may read 0.0 at the tiny scale (the clock's tick is 10 ms)
        floor_ok = w["name"].endswith("-cpu") and cell["median"] == 0
        if cell["error"] or cell["median"] is None or (cell["median"] <= 0 and not floor_ok):
            failed[w["name"]] = cell["error"] or f"no value: {cell}"
    assert not failed, failed


def test_json_carries_machine_and_ratios(tiny_run):
    _, data = tiny_run
    meta = data["meta"]
    for k in ("date", "nproc", "ram_gib", "kernel", "fuse-overlayfs", "fusesnap", "runs", "command"):
        assert k in meta
    assert meta["workset"]["rootfs_layer2_whiteouts"] > 0 and meta["workset"]["rootfs_layer2_opaque_dirs"] > 0
    walk = next(w for w in data["workloads"] if w["name"] == "walk-warm")
    assert walk["ratios"]["fuse-overlayfs/plain"] == pytest.approx(
        walk["targets"]["fuse-overlayfs"]["median"] / walk["targets"]["plain"]["median"])


def test_layer_tar_has_real_whiteouts_and_opaque_dirs(tiny_run, tiny_cache):
    with tarfile.open(tiny_cache / "tars" / "rootfs-layer2.tar") as tf:
        names = tf.getnames()
    assert "usr/share/doc/.wh..wh..opq" in names
    assert any(n.startswith("usr/share/man/man1/.wh.tool") for n in names)
    assert "usr/share/info/.wh.dir" in names
    assert not any(n.startswith("usr/share/doc/pkg") for n in names)


def test_missing_target_is_na_not_a_crash(tiny_run, tiny_cache, tmp_path):
    p = bench("--scale", "tiny", "--cache", str(tiny_cache), "--runs", "1", "--no-drop-caches",
              "--only", "walk-warm,mount-1", "--targets", "plain,fusesnap-overlay,fusesnap",
              "--fusesnap-bin", str(tmp_path))
    assert p.returncode == 0, p.stderr
    row = next(line for line in p.stdout.splitlines() if line.startswith("| rootfs walk"))
    assert row.count("n/a[") == 2
    assert "fusesnap-overlay: command not found" in p.stdout and "fusesnap: command not found" in p.stdout


def test_bad_arguments_are_one_line_errors():
    p = bench("--only", "no-such-workload")
    assert p.returncode == 2 and "unknown workload no-such-workload" in p.stderr
    p = bench("--targets", "plain,zfs")
    assert p.returncode == 2 and "unknown target zfs" in p.stderr


def test_saved_json_renders_the_same_table(tiny_run, tiny_cache):
    p, _ = tiny_run
    again = bench("--from-json", str(tiny_cache.parent / "result.json"))
    assert again.returncode == 0, again.stderr
    rows = [line for line in again.stdout.splitlines() if line.startswith("|")]
    assert len(rows) >= 22 and all(r in p.stdout for r in rows)


def test_writable_workloads_run_on_a_fresh_ext4_gone_afterwards(tiny_run, tiny_cache):
    _, data = tiny_run
    assert data["meta"]["scratch_fs"].startswith("fresh ext4")      # the default as root
    assert not (tiny_cache / "run.img").exists()
    assert str(tiny_cache) not in Path("/proc/self/mountinfo").read_text()


def test_free_page_reporting_is_off_during_a_run_and_restored_after(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from benchlib.memreport import NEVER, no_free_page_reporting
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    param = tmp_path / "page_reporting_order"
    param.write_text("9\n")
    with no_free_page_reporting(param) as what:
        assert param.read_text().strip() == str(NEVER) and "9 ->" in what
    assert param.read_text().strip() == "9"
    with no_free_page_reporting(tmp_path / "missing") as what:
        assert "not changed" in what
