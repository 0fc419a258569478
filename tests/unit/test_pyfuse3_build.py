"""The pyfuse3 that scripts/setup builds (third_party/pyfuse3) carries every patch fusesnap
relies on, and importing it stays cheap (no importlib.metadata lookup, patch 0007)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version


def test_patched_pyfuse3_has_every_feature_and_its_own_version() -> None:
    import pyfuse3

    for flag in ("OPENDIR_FILEINFO", "NO_OPENDIR", "NO_OPEN", "READDIRPLUS_AUTO", "READ_FD"):
        assert getattr(pyfuse3, flag, False) is True, flag
    assert hasattr(pyfuse3.Operations, "fallocate") and hasattr(pyfuse3.Operations, "lseek")
    assert hasattr(pyfuse3.Operations, "handle_killpriv_v2") and callable(pyfuse3.killpriv_v2_active)
    assert hasattr(pyfuse3.SetattrFields(), "kill_suidgid")
    assert pyfuse3.__version__ == version("pyfuse3")
    assert "+fusesnap" in pyfuse3.__version__


def test_importing_pyfuse3_does_not_load_importlib_metadata() -> None:
    out = subprocess.run([sys.executable, "-c",
                          "import sys, pyfuse3; print('importlib.metadata' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
