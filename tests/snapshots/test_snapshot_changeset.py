"""The changeset tar commit/diff write from an upper dir: OCI whiteouts, presented owners, determinism."""

import hashlib
import io
import os
import subprocess
import tarfile

import pytest

from fusesnap.snapshots.changeset import ChunkReader, scan_upper


def make_upper(root, *, mknod_whiteout: bool):
    u = root / "upper"
    u.mkdir()
    (u / "etc").mkdir()
    (u / "etc" / "hosts").write_bytes(b"10.0.0.2 mydomain\n")
    os.chmod(u / "etc" / "hosts", 0o644)
    (u / "bin").mkdir()
    (u / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(u / "bin" / "tool", 0o4755)
    os.link(u / "bin" / "tool", u / "bin" / "tool-link")
    os.symlink("tool", u / "bin" / "sym")
    # deletions: a whiteout for etc/old (device or .wh. file), one for "gone" at the root
    if mknod_whiteout:
        os.mknod(u / "etc" / "old", 0o600 | 0o020000, os.makedev(0, 0))
    else:
        (u / "etc" / ".wh.old").write_bytes(b"")
    (u / ".wh.gone").write_bytes(b"")
    # an opaque directory (rootless marker xattr) and one with a .wh..wh..opq file
    (u / "lib").mkdir()
    os.setxattr(u / "lib", "user.fuseoverlayfs.opaque", b"y")
    (u / "lib" / "new").write_bytes(b"x")
    (u / "var").mkdir()
    (u / "var" / ".wh..wh..opq").write_bytes(b"")
    # presented metadata the daemon could not apply: owner 1:2, mode 0640
    (u / "etc" / "shadow").write_bytes(b"secret")
    os.setxattr(u / "etc" / "shadow", "user.containers.override_stat", b"1:2:0640")
    os.setxattr(u / "etc" / "hosts", "user.note", b"kept")
    for p in sorted(u.rglob("*"), reverse=True):
        if not p.is_symlink():
            os.utime(p, (1_600_000_000, 1_600_000_000))
    os.utime(u, (1_600_000_000, 1_600_000_000))
    return u


def tar_bytes(upper) -> bytes:
    buf = io.BytesIO()
    scan_upper(upper).write(buf)
    return buf.getvalue()


@pytest.mark.parametrize("mknod", [True, False])
def test_members_order_whiteouts_and_metadata(tmp_path, mknod):
    if mknod and os.geteuid() != 0:
        pytest.skip("mknod of a 0/0 whiteout needs root")
    u = make_upper(tmp_path, mknod_whiteout=mknod)
    data = tar_bytes(u)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        ms = tf.getmembers()
        names = [m.name for m in ms]
        assert names == [
            ".wh.gone", "bin", "bin/sym", "bin/tool", "bin/tool-link",
            "etc", "etc/.wh.old", "etc/hosts", "etc/shadow",
            "lib", "lib/.wh..wh..opq", "lib/new", "var", "var/.wh..wh..opq",
        ]
        by = {m.name: m for m in ms}
        assert by["bin/tool"].mode == 0o4755 and by["bin/tool"].isreg()
        assert by["bin/tool-link"].islnk() and by["bin/tool-link"].linkname == "bin/tool"
        assert by["bin/sym"].issym() and by["bin/sym"].linkname == "tool"
        assert (by["etc/shadow"].uid, by["etc/shadow"].gid, by["etc/shadow"].mode) == (1, 2, 0o640)
        assert tf.extractfile("etc/shadow").read() == b"secret"
        wh = by["etc/.wh.old"]
        assert wh.isreg() and wh.size == 0 and wh.mode == 0 and (wh.uid, wh.gid) == (0, 0)
        assert wh.mtime == by["etc"].mtime == 1_600_000_000
        assert by["etc/hosts"].pax_headers.get("SCHILY.xattr.user.note") == "kept"
        # bookkeeping xattrs of the filesystem never leak into the layer
        assert not any("override_stat" in k or "opaque" in k for m in ms for k in m.pax_headers)
        assert all(m.uname == "" and m.gname == "" for m in ms)
    # plain two-block end, no record padding
    assert data.endswith(b"\0" * 1024) and len(data) % 512 == 0
    # GNU tar reads it
    out = subprocess.run(["tar", "-tvf", "-"], input=data, capture_output=True, check=True)
    assert b"etc/.wh.old" in out.stdout


def test_same_upper_gives_same_bytes_and_reader_matches(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ua = make_upper(tmp_path / "a", mknod_whiteout=False)
    ub = make_upper(tmp_path / "b", mknod_whiteout=False)
    ta, tb = tar_bytes(ua), tar_bytes(ub)
    assert hashlib.sha256(ta).digest() == hashlib.sha256(tb).digest()
    # the lazy reader used for import yields the same stream, whatever the read sizes
    r = ChunkReader(scan_upper(ua).chunks())
    got = b""
    for n in [1, 511, 513, 4096, 1 << 20] * 10:
        got += r.read(n)
    got += r.read()
    assert got == ta


def test_mtime_change_changes_the_tar(tmp_path):
    u = make_upper(tmp_path, mknod_whiteout=False)
    before = tar_bytes(u)
    os.utime(u / "etc" / "hosts", (1_600_000_001, 1_600_000_001))
    assert tar_bytes(u) != before


def test_donor_maps_members_to_upper_files(tmp_path):
    u = make_upper(tmp_path, mknod_whiteout=False)
    cs = scan_upper(u)
    assert cs.donor(b"etc/hosts") == str(u / "etc" / "hosts")
    assert cs.donor(b"bin/tool-link") is None  # hard link: the store links, nothing to move
    assert cs.donor(b"etc/.wh.old") is None


def test_long_and_non_ascii_names_round_trip(tmp_path):
    u = tmp_path / "upper"
    deep = u / ("d" * 120) / "ü-файл"
    deep.parent.mkdir(parents=True)
    deep.write_bytes(b"z")
    with tarfile.open(fileobj=io.BytesIO(tar_bytes(u))) as tf:
        assert tf.getnames() == ["d" * 120, "d" * 120 + "/ü-файл"]


def test_presented_types_devices_and_sockets(tmp_path):
    """Rootless uppers keep devices as plain files typed by the override xattr; sockets never reach a tar."""
    import socket

    u = tmp_path / "upper"
    u.mkdir()
    (u / "null").write_bytes(b"")
    os.setxattr(u / "null", "user.containers.override_stat", b"0:0:0666:char-1-3")
    (u / "fakesock").write_bytes(b"")
    os.setxattr(u / "fakesock", "user.containers.override_stat", b"0:0:0755:socket")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(u / "realsock"))
    s.close()
    os.mkfifo(u / "fifo", 0o600)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes(u))) as tf:
        by = {m.name: m for m in tf.getmembers()}
    assert sorted(by) == ["fifo", "null"]
    assert by["null"].ischr() and (by["null"].devmajor, by["null"].devminor, by["null"].mode) == (1, 3, 0o666)
    assert by["fifo"].isfifo() and by["fifo"].mode == 0o600
