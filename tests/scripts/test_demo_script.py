"""The README's first command, scripts/demo, runs to the end: import, byte-exact export,
a snapshot mounted through FUSE, changed and committed (setup skipped: the suite's venv)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import is_root

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not is_root(), reason="the demo mounts as root")
def test_demo_runs_to_the_end(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for k in range(400):              # a listing longer than one pipe write of ls
        d = src / f"package-directory-number-{k:03d}"
        d.mkdir(parents=True)
        (d / "copyright").write_text(f"package {k}\n" * (k % 5 + 1))
    env = dict(os.environ, FUSESNAP_VENV=sys.prefix, FUSESNAP_DEMO_SKIP_SETUP="1")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "demo"), str(src)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "identical: sha256" in r.stdout
    assert "HELLO" in r.stdout
    assert ".wh.package-directory-number-000" in r.stdout        # the deleted directory became a whiteout
    assert "demo-2" in r.stdout and "committed" in r.stdout
