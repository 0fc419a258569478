"""The pyfuse3 that scripts/setup builds (third_party/pyfuse3) carries every patch fusesnap
relies on, and importing it stays cheap (no importlib.metadata lookup, patch 0007)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest


def test_patched_pyfuse3_has_every_feature_and_its_own_version() -> None:
    import pyfuse3

    for flag in ("OPENDIR_FILEINFO", "NO_OPENDIR", "NO_OPEN", "READDIRPLUS_AUTO", "READ_FD", "READDIRPLUS_NAMES"):
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


def test_a_pyfuse3_without_the_patches_is_refused_in_one_line() -> None:
    """fusesnap checks its pyfuse3 build at start: a stock one is named, with the way out."""
    from types import SimpleNamespace

    import pyfuse3

    from fusesnap.errors import FusesnapError
    from fusesnap.fs.fuse.operations import PATCHES, missing_patches, require_patched

    assert missing_patches(pyfuse3) == []
    stock = SimpleNamespace(__version__="3.5.0", Operations=type("Operations", (), {}))
    assert missing_patches(stock) == list(PATCHES)
    with pytest.raises(FusesnapError) as e:
        require_patched(stock)
    msg = str(e.value)
    assert "\n" not in msg and "pyfuse3 3.5.0 lacks fusesnap's patches (0001" in msg and "scripts/setup" in msg
    half = SimpleNamespace(**{k: getattr(pyfuse3, k) for k in dir(pyfuse3) if not k.startswith("__")},
                           __version__=pyfuse3.__version__)
    del half.READ_FD
    assert missing_patches(half) == ["0009 read from an fd"]
    del half.set_request_waiter
    assert missing_patches(half) == ["0009 read from an fd", "0010 request waiter hook"]
