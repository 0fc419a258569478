"""Mutated tars: every import either round-trips byte for byte or fails with InvalidInput and leaves
the store unchanged. Never another exception, never a partial layer."""

from __future__ import annotations

import io
import os
import random
import tarfile


from storeutil import store_state

from fusesnap.errors import InvalidInput
from fusesnap.store import LayerStore
from fusesnap.tarsplit.header import checksum_ok


def base_tar() -> bytes:
    buf = io.BytesIO()
    rnd = random.Random(1)
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        for i in range(6):
            data = rnd.randbytes(rnd.choice((0, 10, 700, 3000)))
            ti = tarfile.TarInfo(f"dir/{'long-' * 30 if i == 2 else ''}f{i}")
            ti.size = len(data)
            ti.pax_headers = {"SCHILY.xattr.user.k": "v"} if i == 3 else {}
            t.addfile(ti, io.BytesIO(data))
        ln = tarfile.TarInfo("dir/link")
        ln.type, ln.linkname = tarfile.SYMTYPE, "f0"
        t.addfile(ln)
        hl = tarfile.TarInfo("dir/hard")
        hl.type, hl.linkname = tarfile.LNKTYPE, "dir/f1"
        t.addfile(hl)
    return buf.getvalue()


def test_mutations(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSESNAP_NO_SYNC", "1")  # durability is not what this test is about
    seed = int.from_bytes(os.urandom(4), "big")
    rnd = random.Random(seed)
    base = base_tar()
    headers = [o for o in range(0, len(base), 512) if base[o:o + 512] != bytes(512) and checksum_ok(base[o:o + 512])]
    st = LayerStore(tmp_path / "root")
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(200):
        data = bytearray(base)
        kind = rnd.choice(("header", "header", "header", "flip", "truncate", "splice", "zero-block"))
        if kind == "header":  # change header fields and fix the checksum, so the fields get parsed
            for _ in range(rnd.randint(1, 3)):
                blk = rnd.choice(headers)
                pos = blk + rnd.choice((rnd.randrange(512), rnd.randrange(100), 156, rnd.randrange(124, 136),
                                        rnd.randrange(157, 257), rnd.randrange(345, 500)))
                data[pos] = rnd.choice((rnd.randrange(256), *b"/.\x00712x5L", 0x80, 0xFF))
                b = data[blk:blk + 512]
                b[148:156] = b" " * 8
                data[blk + 148:blk + 156] = b"%06o\x00 " % sum(b)
        elif kind == "flip":
            for _ in range(rnd.randint(1, 4)):
                pos = rnd.randrange(min(len(data), 8192))
                data[pos] = rnd.randrange(256)
        elif kind == "truncate":
            del data[rnd.randrange(len(data)):]
        elif kind == "splice":
            a = rnd.randrange(len(data))
            data[a:a] = data[rnd.randrange(len(data)):][: rnd.randint(1, 1024)]
        else:
            a = rnd.randrange(len(data) // 512) * 512
            data[a:a + 512] = bytes(512)
        before = store_state(st.root)
        try:
            info = st.import_tar(io.BytesIO(bytes(data)))
        except InvalidInput:
            outcomes["refused"] += 1
            assert store_state(st.root) == before, f"seed {seed}"
            continue
        outcomes["ok"] += 1
        out = io.BytesIO()
        st.export(info.chain_id, out)
        assert out.getvalue() == bytes(data), f"seed {seed}"
        list(st.entries(info.chain_id))
    assert os.listdir(st.root / "staging") == []
    assert st.fsck().ok, f"seed {seed}"
    assert outcomes["ok"] and outcomes["refused"], outcomes
