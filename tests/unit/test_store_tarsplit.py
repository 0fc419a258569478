"""The tar-split index: CRC-64/ISO as Go computes it, and JSON lines in vbatts/tar-split's schema."""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile

import zstandard

from fusesnap.store import LayerStore
from fusesnap.tarsplit.crc64 import crc64_reference, crc64_update, crc_b64


def test_crc64_matches_go_check_value_and_reference():
    assert crc64_reference(b"123456789") == 0xB90956C775A41001  # CRC-64/GO-ISO check value
    data = os.urandom(10_000)
    assert crc64_update(data) == crc64_reference(data)
    assert crc64_update(data[5000:], crc64_update(data[:5000])) == crc64_reference(data)
    assert crc_b64(0xB90956C775A41001) == base64.b64encode(bytes.fromhex("b90956c775a41001")).decode()


def test_index_schema(tmp_path):
    buf = io.BytesIO()
    payload = os.urandom(1234)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        ti = tarfile.TarInfo("dir/\udcff-raw")  # non-UTF-8 name
        ti.size = len(payload)
        t.addfile(ti, io.BytesIO(payload))
    data = buf.getvalue()
    st = LayerStore(tmp_path / "root")
    info = st.import_tar(io.BytesIO(data))
    raw = (st.layer_dir(info.chain_id) / "tar-split.json.zst").read_bytes()
    lines = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read().decode().splitlines()
    objs = [json.loads(x) for x in lines]
    assert [o["position"] for o in objs] == list(range(len(objs)))
    for o in objs:
        assert o["type"] in (1, 2)
        assert list(o) == (["type", "payload", "position"] if o["type"] == 2 else
                           [k for k in ("type", "name", "name_raw", "size", "payload", "position") if k in o])
    files = [o for o in objs if o["type"] == 1]
    assert files[0]["name"] == "dir/" and files[0]["payload"] is None and "size" not in files[0]
    assert base64.b64decode(files[1]["name_raw"]) == b"dir/\xff-raw"
    assert files[1]["size"] == 1234
    assert base64.b64decode(files[1]["payload"]) == crc64_reference(payload).to_bytes(8, "big")
    # segments + payloads in order rebuild the tar
    rebuilt = b"".join(base64.b64decode(o["payload"]) if o["type"] == 2 else (payload if o.get("size") else b"")
                       for o in objs)
    assert rebuilt == data
