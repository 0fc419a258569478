"""Host modes in the store are never wider than what the layer presents, and the store root is
private: created 0700, a root other users can enter is warned about; a file written 0600 through
a mount is 0600 in the committed layer too. The attack is real: another user tries to read the
layer files through a store root opened up to it."""

from __future__ import annotations

import io
import os
import stat
import tarfile

import pytest

from helpers import run_as
from storeutil import fusesnap


def image() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, mode, kind in (("etc", 0o755, tarfile.DIRTYPE), ("etc/shadow", 0o640, tarfile.REGTYPE),
                                 ("etc/gshadow", 0o000, tarfile.REGTYPE), ("etc/passwd", 0o644, tarfile.REGTYPE),
                                 ("root", 0o700, tarfile.DIRTYPE), ("root/secret", 0o644, tarfile.REGTYPE),
                                 ("bin", 0o755, tarfile.DIRTYPE), ("bin/su", 0o4755, tarfile.REGTYPE),
                                 ("home/u/key", 0o600, tarfile.REGTYPE)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode = kind, mode
            data = b"" if kind == tarfile.DIRTYPE else f"content of {name}".encode()
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def host_modes(fs) -> dict[str, int]:
    out = {}
    for dirpath, dirs, files in os.walk(fs):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, fs)] = stat.S_IMODE(os.lstat(p).st_mode)
    return out


def test_root_is_private_and_layer_files_no_wider_than_the_tar(tmp_path):
    root = tmp_path / "root"
    r = fusesnap(root, "import", "-", input=image())
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    chain = r.stdout.split()[0].decode()
    for p in (root, root / "layers", root / "staging", root / "trash", root / "locks"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    assert stat.S_IMODE((root / "metadata.db").stat().st_mode) == 0o600
    modes = host_modes(root / "layers" / chain[7:] / "fs")
    assert modes == {"etc": 0o755, "etc/shadow": 0o640, "etc/gshadow": 0o600, "etc/passwd": 0o644,
                     "root": 0o700, "root/secret": 0o644, "bin": 0o755, "bin/su": 0o755,
                     "home": 0o700, "home/u": 0o700, "home/u/key": 0o600}


@pytest.mark.rootless
def test_another_user_gets_nothing_more_than_presented(shared_tmp, test_user):
    root = shared_tmp / "root"
    r = fusesnap(root, "import", "-", input=image())
    chain = r.stdout.split()[0].decode()
    fs = root / "layers" / chain[7:] / "fs"
    for d in (root / "layers" / chain[7:], root / "layers"):
        assert run_as(test_user, ["ls", str(d)]).returncode != 0  # private all the way down
    for d in (root, root / "layers", fs.parent, fs):  # an operator opens the path up...
        os.chmod(d, 0o755)
    warn = fusesnap(root, "layers")
    assert warn.returncode == 0 and b"searchable by other users" in warn.stderr
    # ...and the files themselves still give nobody more than the tar does
    for rel, readable in (("etc/passwd", True), ("etc/shadow", False), ("etc/gshadow", False),
                          ("root/secret", False), ("home/u/key", False)):
        got = run_as(test_user, ["cat", str(fs / rel)])
        assert (got.returncode == 0) == readable, (rel, got.stderr)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a store snapshot as root")
def test_a_file_written_0600_through_the_mount_stays_0600_after_commit(shared_tmp):
    root, mp = shared_tmp / "root", shared_tmp / "mp"
    mp.mkdir()
    chain = fusesnap(root, "import", "-", input=image()).stdout.split()[0].decode()
    assert fusesnap(root, "prepare", "k", chain).returncode == 0
    assert fusesnap(root, "mount", "k", str(mp)).returncode == 0
    try:
        fd = os.open(mp / "etc" / "private", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"mine alone")
        os.close(fd)
        os.chmod(mp / "etc" / "passwd", 0o600)
        os.mkdir(mp / "root" / "sub", 0o700)
    finally:
        assert fusesnap(root, "umount", str(mp)).returncode == 0
    c = fusesnap(root, "commit", "c", "k")
    assert c.returncode == 0, c.stderr
    new = c.stdout.split()[0].decode()
    modes = host_modes(root / "layers" / new[7:] / "fs")
    assert modes["etc/private"] == 0o600 and modes["etc/passwd"] == 0o600 and modes["root/sub"] == 0o700
    assert all(not m & 0o022 for m in modes.values()), modes
