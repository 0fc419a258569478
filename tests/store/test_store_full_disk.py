"""A full disk around the database: every command fails with one line (never a signal, never a
traceback), nothing half-made stays, and removal works on a 100% full filesystem so space can be
freed through fusesnap itself.

Real full filesystems: a small loop-mounted ext4 with 1 KiB blocks (smaller than a page: what
made SQLite's memory-mapped WAL index raise SIGBUS) and a tmpfs with size=, filled to every level
from ~1.5 MiB free down to nothing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from storeutil import fusesnap

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")


def tar_of(i: int, members: int = 120) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for j in range(members):
            data = f"layer {i} member {j}".encode() * 3
            ti = tarfile.TarInfo(f"d{j % 7}/f{j}")
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(params=["ext4-1k", "tmpfs"])
def small_fs(request, tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    if request.param == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mp)], check=True)
    else:
        if not shutil.which("mkfs.ext4"):
            pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
        img = tmp_path / "fs.img"
        with open(img, "wb") as f:
            f.truncate(16 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "1024", "-m", "0", str(img)], check=True)
        r = subprocess.run(["mount", "-o", "loop", str(img), str(mp)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot loop-mount: {r.stderr.decode().strip()}")
    yield mp
    subprocess.run(["umount", "-l", str(mp)], check=False)


def free_kib(mp: Path) -> int:
    st = os.statvfs(mp)
    return st.f_bavail * st.f_frsize // 1024


def fill_to(mp: Path, kib: int) -> None:
    """Leave about `kib` KiB free (a fill file takes the rest)."""
    fill = mp / "fill"
    fill.unlink(missing_ok=True)
    os.sync()
    want = (free_kib(mp) - kib) * 1024
    if want > 0:
        fd = os.open(fill, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, want)
        except OSError:
            pass
        finally:
            os.close(fd)


def fill_completely(mp: Path) -> None:
    fd = os.open(mp / "fill-rest", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
        os.fsync(fd)
    finally:
        os.close(fd)
    assert free_kib(mp) == 0


def assert_clean_failure_or_success(r: subprocess.CompletedProcess, what: str) -> None:
    err = r.stderr.decode()
    assert r.returncode in (0, 1), f"{what}: killed by signal {-r.returncode}: {err}"
    assert "Traceback" not in err and err.count("\n") <= 1, f"{what}: {err}"
    if r.returncode:
        assert "space" in err.lower(), f"{what}: {err}"


def test_imports_and_listings_at_every_fill_level(small_fs):
    root = small_fs / "root"
    assert fusesnap(root, "layers").returncode == 0
    stored = 0
    levels = [1500, 1000, 800, 600, 500, 400, 300, 250, 200, 150, 120, 100, 80, 60, 40, 30, 20, 10, 5, 0]
    for i, kib in enumerate(levels):
        fill_to(small_fs, kib)
        r = fusesnap(root, "import", "-", input=tar_of(i))
        assert_clean_failure_or_success(r, f"import with {kib} KiB free")
        stored += r.returncode == 0
        for cmd in (["layers"], ["list"], ["--json", "fsck"]):
            r = fusesnap(root, *cmd)
            assert_clean_failure_or_success(r, f"{cmd} with {kib} KiB free")
    assert stored >= 1
    (small_fs / "fill").unlink(missing_ok=True)
    r = fusesnap(root, "--json", "fsck")  # the failed imports left nothing half-made
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stdout
    assert len(json.loads(fusesnap(root, "--json", "layers").stdout)) == stored


def test_removal_works_on_a_full_disk(small_fs):
    root = small_fs / "root"
    chains = []
    for i in range(3):
        r = fusesnap(root, "import", "-", input=tar_of(100 + i, members=40))
        assert r.returncode == 0, r.stderr
        chains.append(r.stdout.split()[0].decode())
    for key, parent in (("a", chains[0]), ("b", chains[1])):
        assert fusesnap(root, "prepare", key, parent).returncode == 0
    upper = next((root / "snapshots").glob("[0-9]*")) / "upper"
    (upper / "f").write_bytes(b"change")
    fill_completely(small_fs)
    r = fusesnap(root, "commit", "c", "a")  # cannot work, must say so in one line and lose nothing
    assert_clean_failure_or_success(r, "commit on a full disk")
    assert r.returncode == 1 and (upper / "f").read_bytes() == b"change"
    for cmd in (["rm", chains[2]], ["remove", "b"], ["remove", "a"], ["gc"]):
        r = fusesnap(root, *cmd)
        assert r.returncode == 0, (cmd, r.stderr)
    assert free_kib(small_fs) > 0
    (small_fs / "fill-rest").unlink()
    r = fusesnap(root, "--json", "fsck")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stdout
    assert [i["chain_id"] for i in json.loads(fusesnap(root, "--json", "layers").stdout)] == chains[:2]


def sparse_claim(name: str, size: int) -> bytes:
    """A PAX 1.0 sparse member that claims `size` bytes and carries one (the last)."""
    smap = b"1\n%d\n1\n" % (size - 1)
    data = smap + bytes(-len(smap) % 512) + b"x"
    ti = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    ti.size = len(data)
    ti.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                      "GNU.sparse.realsize": str(size)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_a_claim_larger_than_the_filesystem_holds_names_its_member(small_fs):
    root = small_fs / "root"
    huge = 100 << 40  # 100 TiB: more than any ext4 file (16 GiB with 1 KiB blocks) or tmpfs may hold
    r = fusesnap(root, "import", "-", input=sparse_claim("var/log/huge.img", huge))
    err = r.stderr.decode()
    if r.returncode == 0:  # a filesystem that holds it (sparse): then it round-trips
        assert fusesnap(root, "export", r.stdout.split()[0].decode()).stdout == sparse_claim("var/log/huge.img", huge)
        return
    assert r.returncode == 1 and err.count("\n") == 1, err
    assert "var/log/huge.img" in err and str(huge) in err, err
    r = fusesnap(root, "--json", "fsck")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stdout
