"""`export -o PATH` (and `diff -o`) never replaces what PATH is: a regular file is replaced whole
only once the tar is complete, a fifo or device gets the tar written in place, a symlink or a
directory is refused and left as it was."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from storeutil import fusesnap, tar_of



@pytest.fixture
def store(tmp_path):
    root = tmp_path / "root"
    data = tar_of({"f": os.urandom(300_000)})
    assert fusesnap(root, "import", "--name", "l", "-", input=data).returncode == 0
    return root, data


def test_regular_file_replaced_whole_keeping_its_mode(tmp_path, store):
    root, data = store
    out = tmp_path / "out.tar"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    assert fusesnap(root, "export", "l", "-o", str(out)).returncode == 0
    assert out.read_bytes() == data and stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == ["out.tar", "root"]  # no temp file left
    r = fusesnap(root, "export", "nope", "-o", str(out))
    assert r.returncode == 1 and out.read_bytes() == data


def test_symlink_is_refused_and_kept(tmp_path, store):
    root, _ = store
    target = tmp_path / "victim"
    target.write_bytes(b"keep me")
    link = tmp_path / "link.tar"
    link.symlink_to(target)
    r = fusesnap(root, "export", "l", "-o", str(link))
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"symbolic link" in r.stderr
    assert link.is_symlink() and os.readlink(link) == str(target) and target.read_bytes() == b"keep me"
    r = fusesnap(root, "export", "l", "-o", str(tmp_path))
    assert r.returncode == 1 and b"directory" in r.stderr


def test_fifo_gets_the_tar_in_place(tmp_path, store):
    root, data = store
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    r = fusesnap(root, "export", "l", "-o", str(fifo), timeout=60)
    reader.join(timeout=60)
    assert r.returncode == 0, r.stderr
    assert got == [data] and stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes needs root")
def test_device_nodes_are_written_never_replaced(store, tmp_path):
    """Nodes of the test's own (null and full, as /dev has them): a regression must not be
    able to turn the machine's /dev/null into a file."""
    root, _ = store
    for name, minor in (("null", 3), ("full", 7)):
        dev = tmp_path / name
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, minor))
        before = os.lstat(dev)
        r = fusesnap(root, "export", "l", "-o", str(dev))
        after = os.lstat(dev)
        assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino
        if name == "full":
            assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"No space left" in r.stderr
        else:
            assert r.returncode == 0, r.stderr
