"""Import and export show progress on a terminal, and only there (scripts see the documented output)."""

from __future__ import annotations

import os
import pty
import subprocess
import tarfile

import pytest

from helpers import script


@pytest.fixture(scope="module")
def big_tar(tmp_path_factory):
    """A tar with 768 MiB of zeros: long enough for several progress redraws."""
    d = tmp_path_factory.mktemp("progress")
    src = d / "big"
    with open(src, "wb") as f:
        f.truncate(768 << 20)
    tar = d / "big.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as t:
        t.add(src, arcname="big")
    return tar


def run_with_tty_stderr(cmd: list[str]) -> tuple[int, bytes, bytes]:
    """Run cmd with stdout a pipe and stderr a pseudo-terminal; return (rc, stdout, terminal output)."""
    master, slave = pty.openpty()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO once the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    out = p.stdout.read()
    rc = p.wait()
    os.close(master)
    return rc, out, seen


def test_import_and_export_draw_progress_on_a_terminal(big_tar, tmp_path):
    root = tmp_path / "root"
    rc, out, tty = run_with_tty_stderr([script("fusesnap"), "--root", str(root), "import", str(big_tar)])
    assert rc == 0, tty
    assert len(out.splitlines()) == 2  # chainID, diffID: unchanged by the progress line
    assert b"importing: " in tty and b"MB/s" in tty and b"%" in tty
    chain = out.splitlines()[0].decode()
    rc, out, tty = run_with_tty_stderr([script("fusesnap"), "--root", str(root), "export", chain,
                                        "-o", str(tmp_path / "out.tar")])
    assert rc == 0, tty
    assert b"exporting: " in tty
    assert (tmp_path / "out.tar").read_bytes() == big_tar.read_bytes()


def test_no_progress_when_stderr_is_not_a_terminal(big_tar, tmp_path):
    p = subprocess.run([script("fusesnap"), "--root", str(tmp_path / "root"), "import", str(big_tar)],
                       capture_output=True, check=True)
    assert p.stderr == b""
    assert len(p.stdout.splitlines()) == 2
