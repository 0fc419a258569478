"""fusesnap.linux.callers tells open(O_TRUNC) from truncate(2) by the system call the
caller waits in (both reach a zero-message-open mount as the same size SETATTR)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusesnap.linux.callers import in_open

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64", "riscv64"),
                                reason="system call numbers known for these architectures")


def _blocked(args: list[str]) -> subprocess.Popen:
    p = subprocess.Popen(args)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:       # wait until it sleeps in the kernel
        try:
            if Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "S":
                nr = Path(f"/proc/{p.pid}/syscall").read_text().split()[0]
                if nr.isdigit():
                    return p
        except OSError:
            pass
        time.sleep(0.01)
    p.kill()
    raise AssertionError("the helper process never blocked")


def test_a_process_blocked_in_open_is_seen_in_open(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # opening a fifo for reading blocks in openat until a writer comes
    p = _blocked([sys.executable, "-c", f"open({str(fifo)!r}, 'rb')"])
    try:
        assert in_open(p.pid) is True
    finally:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        p.wait(10)


def test_a_process_blocked_elsewhere_is_not_in_open() -> None:
    p = _blocked([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert in_open(p.pid) is False
    finally:
        p.kill()
        p.wait(10)


def test_an_unknown_process_is_unknown() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(10)
    assert in_open(p.pid) is None        # gone (and reaped)
    assert in_open(0) is None
