"""Import then export reproduces every corpus tar byte for byte; entries() shows the tar's metadata."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from corpus import LONG, NON_UTF8, build_corpus
from storeutil import uncompressed

from fusesnap.digest import chain_id
from fusesnap.store import LayerStore

NAMES = ["gnu", "oldgnu", "posix", "posix-sparse-0.0", "posix-sparse-0.1", "ustar", "gnu-numeric",
         "bsdtar-pax", "bsdtar-ustar", "pytarfile-gnu", "pytarfile-pax", "pytarfile-ustar", "pax-global",
         "dpkg-data", "sdist", "junk-after-end", "one-end-block", "no-end-blocks", "gzip", "zstd", "duplicate"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st = LayerStore(tmp_path_factory.mktemp("store") / "root")
    yield st
    st.close()


def _import(store: LayerStore, path: Path):
    with open(path, "rb") as f:
        return store.import_tar(f)


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_is_byte_exact(store, corpus, name):
    raw = corpus[name].read_bytes()
    plain = uncompressed(raw)
    info = _import(store, corpus[name])
    assert info.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert info.chain_id == info.diff_id and info.parent is None
    if plain is not raw:
        assert "sha256:" + hashlib.sha256(raw).hexdigest() in info.compressed_digests
    out = io.BytesIO()
    store.export(info.chain_id, out)
    assert out.getvalue() == plain


def test_entries_match_tarfile(store, corpus):
    """Metadata as the tar recorded it: owners, setuid, devices, link targets, non-UTF-8 names."""
    info = _import(store, corpus["posix"])
    got = {e.path: e for e in store.entries(info.chain_id)}
    with tarfile.open(corpus["posix"], encoding="utf-8", errors="surrogateescape") as t:
        members = [m for m in t.getmembers() if m.name not in (".", "./")]
    assert len(got) == len(members)
    for m in members:
        path = os.fsencode(m.name[2:] if m.name.startswith("./") else m.name)
        e = got[path]
        assert e.mode == m.mode and e.uid == m.uid and e.gid == m.gid, m.name
        assert e.mtime_ns == int(m.mtime * 1e9) or e.mtime_ns // 10**9 == int(m.mtime), m.name
        if m.isreg():
            assert e.kind == "reg" and e.size == m.size
        elif m.issym():
            assert e.kind == "sym" and e.linkname == os.fsencode(m.linkname)
        elif m.islnk():
            assert e.kind == "hard" and e.linkname == os.fsencode(m.linkname.removeprefix("./"))
        elif m.ischr() or m.isblk():
            assert (e.devmajor, e.devminor) == (m.devmajor, m.devminor)
    assert got[b"bin/tool-hardlink"].mode & stat.S_ISUID or got[b"bin/tool"].mode & stat.S_ISUID
    assert os.fsencode(LONG) in got and NON_UTF8 in got
    assert got[b"etc/hostname"].xattrs.get(b"user.fusesnap.test") == b"xattr-value\x00\xff"
    if os.geteuid() == 0:
        assert got[b"var/null"].kind == "chr" and (got[b"var/null"].devmajor, got[b"var/null"].devminor) == (1, 3)
        assert (got[b"etc/hostname"].uid, got[b"etc/hostname"].gid) == (1234, 5678)
    assert got[b"var/.wh.gone"].kind == "reg"  # whiteouts are plain members for the store


@pytest.mark.parametrize("name", ["gnu", "oldgnu", "posix", "posix-sparse-0.0", "posix-sparse-0.1"])
def test_sparse_and_data_files_land_in_fs(store, corpus, name):
    info = _import(store, corpus[name])
    fs = store.fs_dir(info.chain_id)
    tree = corpus["gnu"].parent / "tree"
    ents = {e.path: e for e in store.entries(info.chain_id)}
    sp = ents[b"var/sparse.img"]
    assert sp.size == 4 << 20
    data = fs / os.fsdecode(sp.data)
    assert data.read_bytes() == (tree / "var/sparse.img").read_bytes()
    assert os.stat(data).st_blocks * 512 < 1 << 20, "holes must stay holes"
    for e in ents.values():
        if e.kind == "reg":
            assert (fs / os.fsdecode(e.data)).read_bytes() == (tree / os.fsdecode(e.path)).read_bytes()


def test_host_files_are_safe_and_owner_accessible(store, corpus):
    info = _import(store, corpus["posix"])
    fs = store.fs_dir(info.chain_id)
    for dirpath, dirnames, filenames in os.walk(fs):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), n
            assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISFIFO(st.st_mode)), n
            assert st.st_uid == os.geteuid()
            if not stat.S_ISLNK(st.st_mode):
                assert st.st_mode & 0o600 == 0o600, n


def test_duplicate_member_keeps_both_payloads(store, corpus):
    info = _import(store, corpus["duplicate"])
    ents = list(store.entries(info.chain_id))
    assert [e.path for e in ents] == [b"etc/config", b"etc/config", b"etc/config-link"]
    fs = store.fs_dir(info.chain_id)
    assert (fs / "etc/config").read_bytes() == b"second, longer version\n"
    assert os.path.normpath(fs / os.fsdecode(ents[0].data)) != str(fs / "etc/config")
    assert Path(os.path.normpath(fs / os.fsdecode(ents[0].data))).read_bytes() == b"first version\n"


def test_import_is_idempotent_and_parent_gives_chain_id(store, corpus):
    a = _import(store, corpus["gnu"])
    again = _import(store, corpus["gnu"])
    assert again == a
    with open(corpus["dpkg-data"], "rb") as f:
        child = store.import_tar(f, parent=a.chain_id)
    diff = "sha256:" + hashlib.sha256(corpus["dpkg-data"].read_bytes()).hexdigest()
    assert child.diff_id == diff
    assert child.chain_id == chain_id(a.chain_id, diff) != diff
    assert child.parent == a.chain_id
    assert child.size == a.size + child.diff_size
    assert store.chain(child.chain_id) == [a.chain_id, child.chain_id]
    assert store.get(a.chain_id).refcount >= 1
    out = io.BytesIO()
    store.export(child.chain_id, out)
    assert out.getvalue() == corpus["dpkg-data"].read_bytes()


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for ti, data in members:
            t.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _ti(name: str, size: int = 0, typ: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type = size, typ
    return ti


def test_multi_member_gzip_and_multi_frame_zstd(store):
    import gzip

    import zstandard

    plain = _tar([(_ti("a", 5000), os.urandom(5000)), (_ti("b", 3), b"bbb")])
    half = len(plain) // 2
    for blob in (gzip.compress(plain[:half]) + gzip.compress(plain[half:]),
                 zstandard.ZstdCompressor().compress(plain[:half]) + zstandard.ZstdCompressor().compress(plain[half:])):
        info = store.import_tar(io.BytesIO(blob))
        assert info.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() in info.compressed_digests
        out = io.BytesIO()
        store.export(info.chain_id, out)
        assert out.getvalue() == plain


def test_v7_trailing_slash_directory(store):
    data = _tar([(_ti("olddir/"), b""), (_ti("olddir/f", 2), b"hi")])
    info = store.import_tar(io.BytesIO(data))
    kinds = {e.path: e.kind for e in store.entries(info.chain_id)}
    assert kinds == {b"olddir": "dir", b"olddir/f": "reg"}


def test_huge_sparse_file_uses_base256_or_pax_sizes(store, tmp_path):
    """A 9 GiB sparse file: sizes beyond the 8 GiB octal limit, holes kept on the host."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "big", "wb") as f:
        f.seek(9 << 30)
        f.write(b"tail")
    for fmt in ("gnu", "posix"):
        t = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", "-C", str(src), f"--format={fmt}", "--sparse", "-cf", str(t), "big"], check=True)
        info = store.import_tar(open(t, "rb"))
        (e,) = list(store.entries(info.chain_id))
        assert e.size == (9 << 30) + 4
        data = store.fs_dir(info.chain_id) / "big"
        assert os.stat(data).st_size == e.size and os.stat(data).st_blocks < 1024
        out = io.BytesIO()
        store.export(info.chain_id, out)
        assert out.getvalue() == t.read_bytes()


def test_fsck_is_clean_after_the_corpus(store, corpus):
    for name in NAMES:
        _import(store, corpus[name])
    rep = store.fsck()
    assert rep.ok and rep.checked >= len(NAMES) - 2, rep.problems
