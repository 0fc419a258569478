"""scripts/stress.py --short: the CI run of the stress script (seeded kills of import, commit,
remove, gc and a live mount's daemon; hostile inputs; concurrent clients; an fsx load in a
mount with 8 workers), each phase ending in a clean fsck with every acknowledged byte present."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import is_root

STRESS = Path(__file__).resolve().parents[2] / "scripts" / "stress.py"

pytestmark = pytest.mark.skipif(not is_root(), reason="mounts FUSE snapshots of a root-owned store")


def test_stress_short(tmp_path):
    seed = int(os.environ.get("FUSESNAP_STRESS_SEED", time.time()))
    out = tmp_path / "figures.json"
    p = subprocess.run([sys.executable, str(STRESS), "--short", "--seed", str(seed), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"seed {seed}:\n{p.stderr[-4000:]}"
    fig = json.loads(out.read_text())
    assert set(fig["kills"]) == {"import", "commit", "remove", "gc", "daemon"}
    assert all(k["kills"] >= 4 for k in fig["kills"].values())
    assert fig["fsx"]["workers"] == 8 and fig["fsx"]["operations"] > 0
    assert fig["hostile"]["tried"] == fig["hostile"]["accepted"] + fig["hostile"]["refused"]
