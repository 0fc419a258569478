"""Rootless: an unprivileged user imports and exports layers with setuid files, devices, foreign owners,
unreadable modes; nothing privileged lands on the host and the bytes come back exactly."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import tarfile

import pytest

from corpus import build_corpus
from helpers import run_as, script, user_env

pytestmark = pytest.mark.rootless


def hostile_modes_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, typ, mode in (("locked", tarfile.DIRTYPE, 0o000), ("locked/secret", tarfile.REGTYPE, 0o000),
                                ("ro", tarfile.DIRTYPE, 0o555), ("ro/suid", tarfile.REGTYPE, 0o6755),
                                ("ro/dev", tarfile.CHRTYPE, 0o600)):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.uid, ti.gid = typ, mode, 0, 0
            data = b""
            if typ == tarfile.REGTYPE:
                data = b"payload\n"
                ti.size = len(data)
            if typ == tarfile.CHRTYPE:
                ti.devmajor, ti.devminor = 1, 3
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_rootless_import_export(test_user, shared_tmp):
    corpus = build_corpus(shared_tmp / "corpus")
    (shared_tmp / "modes.tar").write_bytes(hostile_modes_tar())
    root = shared_tmp / "userstore"
    env = user_env(test_user, FUSESNAP_ROOT=str(root))
    for name in ("posix", "gnu", "oldgnu", "bsdtar-pax", "zstd"):
        src = corpus[name]
        r = run_as(test_user, [script("fusesnap"), "--json", "import", str(src)], env=env)
        assert r.returncode == 0, r.stderr
        chain = json.loads(r.stdout)["chain_id"]
        out = shared_tmp / f"{name}.out"
        r = run_as(test_user, [script("fusesnap"), "export", chain, "-o", str(out)], env=env)
        assert r.returncode == 0, r.stderr
        raw = src.read_bytes()
        if name == "zstd":
            import zstandard
            raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
        assert out.read_bytes() == raw, name
    r = run_as(test_user, [script("fusesnap"), "--json", "import", str(shared_tmp / "modes.tar")], env=env)
    assert r.returncode == 0, r.stderr
    chain = json.loads(r.stdout)["chain_id"]
    check = (
        "import json,sys\n"
        "from fusesnap.store import LayerStore\n"
        f"st=LayerStore({str(root)!r})\n"
        f"print(json.dumps([[e.path.decode(), e.kind, e.mode, e.uid] for e in st.entries({chain!r})]))\n"
    )
    r = run_as(test_user, [sys.executable, "-c", check], env=env)
    assert r.returncode == 0, r.stderr
    ents = {p: (k, m, u) for p, k, m, u in json.loads(r.stdout)}
    assert ents["ro/suid"] == ("reg", 0o6755, 0) and ents["locked"] == ("dir", 0o000, 0)
    assert ents["ro/dev"][0] == "chr"
    for dirpath, dirnames, filenames in os.walk(root / "layers"):
        for n in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, n))
            assert st.st_uid == test_user.pw_uid, n
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), n
            assert not stat.S_ISCHR(st.st_mode) and not stat.S_ISBLK(st.st_mode), n
            if not stat.S_ISLNK(st.st_mode):
                assert st.st_mode & 0o600 == 0o600, n
    r = run_as(test_user, [script("fusesnap"), "fsck"], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_as(test_user, [script("fusesnap"), "rm", chain], env=env)
    assert r.returncode == 0, r.stderr
