"""Memory stays bounded whatever the input: junk after the end blocks and a zstd bomb cost an
import no more than a fixed budget, and a layer of many empty members costs per entry no more
than its budget in the import, in the mount command that builds the chain's tree, and in the
daemon that serves it. Peak RSS of the real processes; sizes are scaled down from the issue's
(1 GiB of junk, 1,000,000 members) to keep CI short, the budgets are the same."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import pytest
import zstandard

from helpers import is_mounted, one_file_tar, script, unmount

IMPORT_BUDGET = 64 << 20  # bytes of peak RSS for an import, whatever the junk
# bytes per member, above a fixed base; "daemon" is a mount command's own daemon, "served daemon"
# the mount server's worker that ran the command and serves the mount (cli/mountserver.py)
PER_ENTRY = {"import": 150, "mount command": 300, "daemon": 150, "served daemon": 150}
OWN_PROCESS = {**os.environ, "FUSESNAP_MOUNT_SERVER": "0"}


def peak(*argv: str, stdin: Path | None = None, env: dict[str, str] | None = None) -> int:
    """Peak RSS (bytes) of one command, run alone in a fresh parent; it must succeed."""
    code = ("import resource, subprocess, sys\n"
            "f = open(sys.argv[1], 'rb') if sys.argv[1] else None\n"
            "r = subprocess.run(sys.argv[2:], stdin=f, capture_output=True)\n"
            "sys.stderr.write(r.stderr.decode())\n"
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n")
    p = subprocess.run([sys.executable, "-c", code, str(stdin or ""), *argv], capture_output=True, text=True,
                       timeout=600, env=env)
    rc, rss = p.stdout.split()
    assert rc == "0", p.stderr
    return int(rss)


def fs(root: Path, *args: str) -> list[str]:
    return [script("fusesnap"), "--root", str(root), *args]


def small_tar() -> bytes:
    return one_file_tar("f", b"hello")


def test_junk_after_the_end_blocks_gzip(tmp_path):
    junk = 256 << 20
    blob = tmp_path / "junk.tar.gz"
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    with open(blob, "wb") as f:
        f.write(z.compress(small_tar()))
        zeros = bytes(1 << 20)
        for _ in range(junk >> 20):
            f.write(z.compress(zeros))
        f.write(z.flush())
    assert blob.stat().st_size < 2 << 20
    rss = peak(*fs(tmp_path / "root", "import", "-"), stdin=blob)
    assert rss <= IMPORT_BUDGET, f"import of {junk >> 20} MiB of junk peaked at {rss >> 20} MiB"


def test_zstd_bomb_after_the_end_blocks(tmp_path):
    blob = tmp_path / "bomb.tar.zst"
    c = zstandard.ZstdCompressor(level=19).compressobj()
    with open(blob, "wb") as f:
        f.write(c.compress(small_tar()))
        zeros = bytes(1 << 20)
        for _ in range(256):
            f.write(c.compress(zeros))
        f.write(c.flush())
    assert blob.stat().st_size < 64 << 10
    rss = peak(*fs(tmp_path / "root", "import", "-"), stdin=blob)
    assert rss <= IMPORT_BUDGET, f"import of a 256 MiB zstd bomb peaked at {rss >> 20} MiB"


def many_members(path: Path, n: int) -> None:
    """A tar of n empty files in 1000 directories, written header by header (fast)."""
    with open(path, "wb") as f:
        buf = []
        for i in range(n):
            ti = tarfile.TarInfo(f"d{i % 1000}/f{i}")
            buf.append(ti.tobuf(tarfile.USTAR_FORMAT))
            if len(buf) >= 10000:
                f.write(b"".join(buf))
                buf.clear()
        f.write(b"".join(buf) + bytes(1024))


def daemon_rss(mp: Path) -> int:
    want = os.fsencode(str(mp))
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"mount" in argv and want in argv:
                for line in Path(f"/proc/{d}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
    raise AssertionError(f"no daemon serves {mp}")


def rss_then_unmount(mp: Path) -> int:
    """RSS of the daemon of the live mount mp (1000 directories at its top), then unmounted."""
    try:
        time.sleep(0.5)
        rss = daemon_rss(mp)
        assert len(os.listdir(mp)) == 1000
    finally:
        unmount(mp)
    assert not is_mounted(mp)
    return rss


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a store snapshot as root")
def test_per_entry_memory_of_import_mount_command_and_daemon(shared_tmp):
    small, big = 20_000, 200_000
    costs: dict[str, dict[int, int]] = {k: {} for k in PER_ENTRY}
    for n in (small, big):
        tarp = shared_tmp / f"m{n}.tar"
        many_members(tarp, n)
        root, mp = shared_tmp / f"root{n}", shared_tmp / f"mp{n}"
        mp.mkdir()
        costs["import"][n] = peak(*fs(root, "import", str(tarp)))
        tarp.unlink()
        chain = subprocess.run(fs(root, "layers", "--json"), capture_output=True, text=True).stdout
        chain = chain.split('"chain_id": "')[1].split('"')[0]
        assert subprocess.run(fs(root, "view", "v", chain), capture_output=True).returncode == 0
        # through the mount server: its worker has the tree built (in a child) and serves
        assert subprocess.run(fs(root, "mount", "v", str(mp)), capture_output=True).returncode == 0
        costs["served daemon"][n] = rss_then_unmount(mp)
        for cached in (root / "cache" / "lowertrees").iterdir():
            cached.unlink()               # the command builds it again, in its own process
        costs["mount command"][n] = peak(*fs(root, "mount", "v", str(mp)), env=OWN_PROCESS)
        costs["daemon"][n] = rss_then_unmount(mp)
    report = []
    for what, budget in PER_ENTRY.items():
        per_entry = (costs[what][big] - costs[what][small]) / (big - small)
        report.append(f"{what}: {per_entry:.0f} B/entry (budget {budget})")
        assert per_entry <= budget, "; ".join(report)
    print("; ".join(report))
