"""Busy polling for the next request (fs/fastloop.py, option busy_poll=N): when it
spins, that a paced or idle client does not keep the daemon spinning, and the option."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusesnap.errors import InvalidInput
from fusesnap.fs.fuse import fastloop
from fusesnap.fs.options import parse_options
from helpers import is_root
from unionmount import FUSESNAP, layout, mkfile, mount_union


def test_a_hit_keeps_spinning_and_misses_back_off_to_one_spin_in_64_waits() -> None:
    b = fastloop.SpinBudget(50)
    assert b.take() == 50_000
    b.hit()
    assert b.take() == 50_000
    skipped = []
    for _ in range(10):                      # a client that never comes back in time
        b.miss()
        n = 0
        while b.take() == 0:
            n += 1
        skipped.append(n)
    assert skipped == [1, 2, 4, 8, 16, 32, 64, 64, 64, 64]
    b.hit()                                  # one request in the window: spin every wait again
    b.miss()
    assert b.take() == 0 and b.take() == 50_000
    assert fastloop.SpinBudget(0).take() == 0


def test_busy_poll_option(capsys: pytest.CaptureFixture[str]) -> None:
    from fusesnap.cli.overlay import main
    assert main(["--help"]) == 0
    assert "busy_poll=US" in capsys.readouterr().out
    assert parse_options([]).busy_poll_us is None
    assert parse_options(["busy_poll=0"]).busy_poll_us == 0
    assert parse_options(["lowerdir=/a,busy_poll=200"]).busy_poll_us == 200
    for bad in ("busy_poll=-1", "busy_poll=fast"):
        with pytest.raises(InvalidInput, match="busy_poll"):
            parse_options([bad])


def test_default_spins_only_where_the_daemon_can_run_beside_its_client() -> None:
    code = "from fusesnap.fs.fuse import fastloop; print(fastloop.default_busy_poll_us())"
    one = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code],
                         capture_output=True, text=True, check=True)
    assert one.stdout.strip() == "0"
    if len(os.sched_getaffinity(0)) >= 2:
        assert fastloop.default_busy_poll_us() == fastloop.BUSY_POLL_US > 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_container_cpu_quota_counts_as_fewer_cpus(tmp_path: Path) -> None:
    """A CI container limited to one CPU's time by its cgroup does not spin, though it
    sees all the host's CPUs; an ancestor's quota counts too (v2 cpu.max, v1 cfs)."""
    proc = tmp_path / "cgroup"
    v2 = tmp_path / "v2"
    _write(proc, "0::/ci/job\n")
    _write(v2 / "ci/job/cpu.max", "max 100000\n")
    assert fastloop._cgroup_cpu_limit(str(proc), str(v2)) is None
    _write(v2 / "ci/cpu.max", "150000 100000\n")
    assert fastloop._cgroup_cpu_limit(str(proc), str(v2)) == 1.5
    _write(v2 / "ci/job/cpu.max", "400000 100000\n")
    assert fastloop._cgroup_cpu_limit(str(proc), str(v2)) == 1.5
    v1 = tmp_path / "v1"
    _write(proc, "12:memory:/x\n4:cpu,cpuacct:/docker/abc\n")
    _write(v1 / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    _write(v1 / "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert fastloop._cgroup_cpu_limit(str(proc), str(v1)) is None
    _write(v1 / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "100000\n")
    assert fastloop._cgroup_cpu_limit(str(proc), str(v1)) == 1.0
    assert fastloop._cgroup_cpu_limit(str(tmp_path / "none"), str(v1)) is None


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not is_root(), reason="needs root to mount without fusermount3")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="busy polling needs two CPUs")
def test_a_paced_or_idle_client_does_not_keep_the_daemon_spinning(shared_tmp: Path) -> None:
    """With a 5 ms spin (100x the default, so a spin that never stopped would show),
    a client pausing 10 ms between requests costs a few spins, an idle mount none."""
    lowers, upper, work, mnt = layout(shared_tmp, 1)
    mkfile(lowers[0] / "f", "f")
    u = mount_union(FUSESNAP, mnt, lowers, upper, work, ["busy_poll=5000"])
    try:
        (pid,) = u.pids
        target = u.p("f")
        os.listxattr(target)                 # warm up: lookups done
        c0 = _cpu_seconds(pid)
        for _ in range(100):                 # every listxattr is a request
            os.listxattr(target)
            time.sleep(0.01)
        paced = _cpu_seconds(pid) - c0
        # spinning after every request would be 100 x 5 ms = 0.5 s
        assert paced < 0.2, paced
        c0 = _cpu_seconds(pid)
        time.sleep(1.0)
        assert _cpu_seconds(pid) - c0 < 0.05
    finally:
        u.unmount()
