"""Hostile tars never touch anything outside the layer: each case is refused or contained as documented
in fusesnap/store/extract.py."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from storeutil import store_state

from fusesnap.errors import InvalidInput
from fusesnap.store import LayerStore


def make_tar(members: list[tuple[str, str, bytes | str]]) -> bytes:
    """members: (name, kind, data-or-linkname); kind in reg/sym/hard/dir."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, val in members:
            ti = tarfile.TarInfo(name)
            if kind == "reg":
                ti.size = len(val)
                t.addfile(ti, io.BytesIO(val))
                continue
            ti.type = {"sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE}[kind]
            ti.linkname = val if isinstance(val, str) else ""
            t.addfile(ti)
    return buf.getvalue()


@pytest.fixture
def env(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("untouched\n")
    st = LayerStore(tmp_path / "root")
    yield st, outside
    st.close()


def assert_outside_untouched(outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_text() == "untouched\n"


@pytest.mark.parametrize("members, why", [
    ([("../escape", "reg", b"x")], "'..'"),
    ([("a/../../escape", "reg", b"x")], "'..'"),
    ([("link", "sym", "{outside}"), ("link/victim", "reg", b"owned")], "not a directory"),
    ([("link", "sym", "{outside}"), ("link/new", "reg", b"owned")], "not a directory"),
    ([("h", "hard", "{outside}/victim")], "hard link"),
    ([("h", "hard", "../outside/victim")], "'..'"),
    ([("h", "hard", "missing")], "hard link"),
    ([("d", "dir", ""), ("d", "reg", b"x")], "replaces an earlier directory"),
], ids=["dotdot", "dotdot-nested", "through-symlink-existing", "through-symlink-new", "hardlink-absolute-out",
        "hardlink-dotdot", "hardlink-missing", "file-over-dir"])
def test_refused(env, members, why):
    st, outside = env
    members = [(n, k, v.replace("{outside}", str(outside)) if isinstance(v, str) else v) for n, k, v in members]
    before = store_state(st.root)
    with pytest.raises(InvalidInput, match=why):
        st.import_tar(io.BytesIO(make_tar(members)))
    assert store_state(st.root) == before
    assert_outside_untouched(outside)


def test_absolute_names_and_escaping_symlinks_are_contained(env):
    st, outside = env
    data = make_tar([
        (str(outside / "victim"), "reg", b"contained"),
        ("up", "sym", "../../../../.."),
        ("abs", "sym", str(outside)),
        ("./abs2", "hard", "abs"),
    ])
    info = st.import_tar(io.BytesIO(data))
    assert_outside_untouched(outside)
    fs = st.fs_dir(info.chain_id)
    rel = str(outside / "victim").lstrip("/")
    assert (fs / rel).read_bytes() == b"contained"
    assert os.readlink(fs / "up") == "../../../../.."
    assert os.readlink(fs / "abs") == str(outside)
    ents = {e.path: e for e in st.entries(info.chain_id)}
    assert rel.encode() in ents and ents[b"abs"].linkname == str(outside).encode()
    out = io.BytesIO()
    st.export(info.chain_id, out)
    assert out.getvalue() == data


def test_symlink_replaced_by_file_does_not_follow(env):
    """A later regular file at a symlink's path replaces the link; it never writes through it."""
    st, outside = env
    data = make_tar([("v", "sym", str(outside / "victim")), ("v", "reg", b"replaced")])
    info = st.import_tar(io.BytesIO(data))
    assert_outside_untouched(outside)
    assert (st.fs_dir(info.chain_id) / "v").read_bytes() == b"replaced"


def test_absurdly_deep_path_is_refused_with_a_short_message(env):
    st, outside = env
    with pytest.raises(InvalidInput, match="deeper than") as exc:
        st.import_tar(io.BytesIO(make_tar([("/".join(["a"] * 3000), "reg", b"x")])))
    assert len(str(exc.value)) < 300
    assert os.listdir(st.root / "staging") == [] and os.listdir(st.root / "layers") == []


def test_random_member_mixes_never_escape(env, monkeypatch):
    """Random sequences of files, dirs, symlinks, hard links and devices over a few colliding names
    (absolute, '..', through-symlink, replacements): each import round-trips or is refused, the store
    stays consistent, and nothing outside changes."""
    import random

    monkeypatch.setenv("FUSESNAP_NO_SYNC", "1")  # durability is not what this test is about
    st, outside = env
    seed = int.from_bytes(os.urandom(4), "big")
    rnd = random.Random(seed)
    names = ["a", "b", "a/b", "a/b/c", "/a", "./a/", "a/./b", "b/c", "c", "x/y/z", ""]
    targets = ["a", "b", "a/b", str(outside), "../outside", str(outside / "victim"), "c", "x", ""]
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(150):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=rnd.choice([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])) as t:
            for _ in range(rnd.randint(1, 8)):
                ti = tarfile.TarInfo(rnd.choice(names))
                kind = rnd.choice(["reg", "reg", "dir", "sym", "hard", "chr", "fifo"])
                data = b""
                if kind == "reg":
                    data = os.urandom(rnd.choice([0, 5, 600]))
                    ti.size = len(data)
                else:
                    ti.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                               "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
                    if kind in ("sym", "hard"):
                        ti.linkname = rnd.choice(targets)
                t.addfile(ti, io.BytesIO(data) if data else None)
        data = buf.getvalue()
        try:
            info = st.import_tar(io.BytesIO(data))
        except InvalidInput:
            outcomes["refused"] += 1
        else:
            outcomes["ok"] += 1
            out = io.BytesIO()
            st.export(info.chain_id, out)
            assert out.getvalue() == data, f"seed {seed}"
            list(st.entries(info.chain_id))
            st.remove(info.chain_id)
        assert_outside_untouched(outside)
    assert st.fsck().ok, f"seed {seed}"
    assert os.listdir(st.root / "staging") == [] and os.listdir(st.root / "layers") == []
    assert outcomes["ok"] and outcomes["refused"], outcomes
