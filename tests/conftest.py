"""Shared fixtures: unprivileged user, world-accessible temp dirs, mount cleanup."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import ensure_test_user, is_root, unmount


@pytest.fixture(scope="session")
def test_user():
    """The unprivileged user rootless tests run as (created on first use; needs root)."""
    if not is_root():
        pytest.skip("creating an unprivileged test user needs root")
    return ensure_test_user()


@pytest.fixture
def shared_tmp(request):
    """A temp dir every user can enter (pytest's tmp_path is 0700 under root)."""
    d = Path(tempfile.mkdtemp(prefix="fusesnap-test-", dir="/var/tmp"))
    os.chmod(d, 0o777)
    yield d
    # Unmount anything a failed test left behind, then remove.
    with open("/proc/self/mountinfo") as f:
        mps = [line.split()[4] for line in f]
    for mp in sorted((m for m in mps if m.startswith(str(d))), key=len, reverse=True):
        try:
            unmount(mp)
        except Exception:
            pass
    shutil.rmtree(d, ignore_errors=True)
