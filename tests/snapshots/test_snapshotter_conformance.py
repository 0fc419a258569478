"""containerd's snapshotter test suite (conformance_suite.py) on the in-process Snapshotter.

The rootless subset and the zombie check are this driver's own: they are about
how the Python API mounts, not about the snapshotter model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conformance_suite import *  # noqa: F401,F403  (every check of the suite runs here)
from conformance_suite import GC, NEEDS_ROOT, Mounted
from fusesnap.snapshots.snapshotter import Snapshotter

pytestmark = NEEDS_ROOT


@pytest.fixture
def env(shared_tmp):
    sn = Snapshotter(shared_tmp / "root")
    work = shared_tmp / "work"
    work.mkdir()
    yield sn, work
    sn.close()


# -- rootless: the same checks, run by the unprivileged user (in-process mounts as that user) -------

ROOTLESS = ["test_basic", "test_stat_committed", "test_transitivity", "test_layer_file_update",
            "test_remove_directory_in_lower_layer", "test_rename_of_a_lower_directory",
            "test_deleted_files_in_child_snapshot", "test_move_file_from_lower_layer", "test_view_readonly",
            "test_root_permission", "test_same_changes_through_mounts_commit_to_the_same_diff_id"]

DRIVER = """
import os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import conformance as c
from fusesnap.snapshots.snapshotter import Snapshotter
os.umask(0)
for name in sys.argv[3:]:
    work = Path(sys.argv[2]) / name
    work.mkdir()
    (work / "work").mkdir()
    sn = Snapshotter(work / "root")
    try:
        getattr(c, name)((sn, work / "work"))
    finally:
        sn.close()
    print("ok", name, flush=True)
"""


@pytest.mark.rootless
def test_rootless_subset(shared_tmp, test_user):
    """Chown needs privileges in the flat reference dir, so Chown/DirectoryPermissionOnCommit stay root-only."""
    import sys

    from helpers import run_as, user_env

    lib = shared_tmp / "lib"
    lib.mkdir()
    shutil.copy(Path(__file__).with_name("conformance_suite.py"), lib / "conformance.py")
    shutil.copy(Path(__file__).parent.parent / "helpers.py", lib / "helpers.py")
    (lib / "driver.py").write_text(DRIVER)
    os.chmod(lib, 0o755)
    work = shared_tmp / "rootless"
    run_as(test_user, ["mkdir", str(work)], check=True)
    r = run_as(test_user, [sys.executable, str(lib / "driver.py"), str(lib), str(work), *ROOTLESS],
               env=user_env(test_user), timeout=240)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert r.stdout.decode().split() == [w for n in ROOTLESS for w in ("ok", n)]


def test_api_mounts_leave_no_daemon_behind(env):
    """The Python API forks the FUSE daemon in-process (double fork): no zombie per mount."""
    sn, work = env

    def zombies() -> set[int]:
        me, out = os.getpid(), set()
        for tid in os.listdir(f"/proc/{me}/task"):
            for pid in open(f"/proc/{me}/task/{tid}/children").read().split():
                try:
                    if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z":
                        out.add(int(pid))
                except OSError:
                    pass
        return out

    before = zombies()
    sn.prepare("k", "", GC)
    sn.view("v", "", GC)
    for key in ("k", "v", "k"):
        with Mounted(sn, key, work / key):
            pass
    assert zombies() - before == set()
