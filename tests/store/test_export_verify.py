"""Export verifies while streaming: a changed file or index is an error naming the file; fsck sees it too."""

from __future__ import annotations

import io
import tarfile

import pytest

from storeutil import fusesnap

from fusesnap.errors import IntegrityError
from fusesnap.store import LayerStore


def layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, data in (("etc/passwd", b"root:x:0:0\n" * 40), ("usr/bin/prog", bytes(range(256)) * 64)):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "delete"])
def test_damaged_file_is_named(tmp_path, damage):
    root = tmp_path / "root"
    st = LayerStore(root)
    info = st.import_tar(io.BytesIO(layer()))
    victim = st.fs_dir(info.chain_id) / "usr/bin/prog"
    if damage == "flip-byte":
        data = bytearray(victim.read_bytes())
        data[100] ^= 1
        victim.write_bytes(data)
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:-1])
    else:
        victim.unlink()
    with pytest.raises(IntegrityError, match="usr/bin/prog"):
        st.export(info.chain_id, io.BytesIO())
    st.close()
    r = fusesnap(root, "export", info.chain_id, "-o", str(tmp_path / "out.tar"))
    assert r.returncode == 1 and b"usr/bin/prog" in r.stderr and r.stderr.count(b"\n") == 1
    assert not (tmp_path / "out.tar").exists(), "a failed export must not leave a partial -o file"
    r = fusesnap(root, "fsck")
    assert r.returncode == 1 and b"usr/bin/prog" in r.stdout


def test_damaged_segment_fails_the_diffid_check(tmp_path):
    import zstandard

    st = LayerStore(tmp_path / "root")
    info = st.import_tar(io.BytesIO(layer()))
    idx = st.layer_dir(info.chain_id) / "tar-split.json.zst"
    text = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(idx.read_bytes()), read_across_frames=True).read()
    first = text.split(b"\n")[0]
    import base64
    import json
    obj = json.loads(first)
    raw = bytearray(base64.b64decode(obj["payload"]))
    raw[0] ^= 0x20  # change the first name character of the header block
    obj["payload"] = base64.b64encode(bytes(raw)).decode()
    text = json.dumps(obj, separators=(",", ":")).encode() + text[len(first):]
    idx.write_bytes(zstandard.ZstdCompressor().compress(text))
    with pytest.raises(IntegrityError, match="diffID"):
        st.export(info.chain_id, io.BytesIO())
    assert not st.fsck().ok


def test_fsck_finds_files_added_to_a_layer(tmp_path):
    st = LayerStore(tmp_path / "root")
    info = st.import_tar(io.BytesIO(layer()))
    assert st.fsck().ok
    (st.fs_dir(info.chain_id) / "etc" / "intruder").write_text("x")
    rep = st.fsck()
    assert not rep.ok and "fs/etc/intruder" in rep.problems[0]
