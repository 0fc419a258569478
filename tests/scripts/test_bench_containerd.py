"""scripts/bench.py --containerd at the tiny scale: every row comes out, every mount succeeds.
No timing assertions: speed is the benchmark's job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients"))
from containerd_env import missing_tools  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools()))


def test_containerd_rows(tmp_path):
    p = subprocess.run([sys.executable, str(BENCH), "--containerd", "--runs", "1", "--scale", "tiny",
                        "--cache", str(tmp_path / "cache")], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in p.stdout.splitlines() if line.startswith("| ")}
    run = rows["`ctr run --rm IMG true`"]
    for sn in ("fusesnap", "fusesnap-fuse3", "proxy-floor", "proxy-fuse-overlayfs", "overlayfs", "native"):
        assert f"{sn} " in run and " ms" in run
    assert "x overlayfs (paired " in run and "IQR " in run
    assert "proxy-floor (no FUSE) " in run and "proxy-fuse-overlayfs " in run
    image = next(v for k, v in rows.items() if k.startswith("`ctr run --rm` of the rootfs image"))
    assert all(f"{sn} " in image for sn in ("fusesnap", "overlayfs", "native")) and "x native" in image
    for row in ("fuse3 mounts, back to back", "bind mounts, back to back", "bind mounts, 0.4 s apart"):
        assert "p50" in rows[f"Prepare+Mounts round trip (gRPC), {row}"]
    assert "5/5 mounted" in rows["5 snapshots prepared and mounted at once"]
    assert "fusesnap " in rows["`ctr images pull` of a 2 MB image (loopback registry)"]
