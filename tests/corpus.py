"""A corpus of odd but real layer tars, made with real tools (GNU tar, bsdtar, tarfile, dpkg-deb, setuptools).

`build_corpus(dir)` returns {name: path}. Every tar must round-trip byte for byte
through import/export. Device nodes appear only when built as root.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LONG = "d" * 60 + "/" + "e" * 70 + "/" + "f" * 80  # > 155 + 100 together: needs GNU/PAX long names
NON_UTF8 = b"caf\xe9-\xff\xfe.txt"


def _run(cmd: list[str], **kw) -> None:
    subprocess.run(cmd, check=True, capture_output=True, **kw)


def make_tree(root: Path, *, long_names: bool = True, special: bool = True) -> Path:
    """A small rootfs-like tree with every kind of member."""
    root.mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("fusesnap\n")
    (root / "etc" / "empty").write_bytes(b"")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(os.urandom(70_000))
    os.chmod(root / "bin" / "tool", 0o4755)  # setuid: recorded, never applied on the host
    os.link(root / "bin" / "tool", root / "bin" / "tool-hardlink")
    os.symlink("tool", root / "bin" / "rel-link")
    os.symlink("/etc/hostname", root / "bin" / "abs-link")
    (root / "usr" / "share").mkdir(parents=True)
    (root / "usr" / "share" / "data.bin").write_bytes(bytes(range(256)) * 513)  # not block-aligned
    (root / "var" / "empty-dir").mkdir(parents=True)
    os.chmod(root / "var" / "empty-dir", 0o1777)
    (root / "var" / ".wh.gone").write_bytes(b"")  # whiteouts are ordinary members for the store
    (root / "var" / "opq").mkdir()
    (root / "var" / "opq" / ".wh..wh..opq").write_bytes(b"")
    if long_names:
        p = root / LONG
        p.parent.mkdir(parents=True)
        p.write_bytes(b"long name\n" * 100)
        os.symlink("t" * 150 + "/" + "u" * 50, root / "long-target-link")
        os.link(p, root / "hardlink-to-long")
        (root / os.fsdecode(NON_UTF8)).write_bytes(b"latin-1 name\n")
    if special:
        os.mkfifo(root / "var" / "fifo")
        sparse = root / "var" / "sparse.img"
        with open(sparse, "wb") as f:
            f.seek(1 << 20)
            f.write(b"middle" * 1000)
            f.seek(3 << 20)
            f.write(b"end")
            f.truncate(4 << 20)
        with open(root / "var" / "many-holes.img", "wb") as f:  # > 4 extents: oldgnu extension blocks
            for i in range(30):
                f.seek(i * 65536)
                f.write(b"%d" % i * 100)
            f.truncate(30 * 65536 + 4096)
        try:
            os.setxattr(root / "etc" / "hostname", "user.fusesnap.test", b"xattr-value\x00\xff")
        except OSError:
            pass
        if os.geteuid() == 0:
            os.mknod(root / "var" / "null", 0o20666, os.makedev(1, 3))
            os.mknod(root / "var" / "loop0", 0o60660, os.makedev(7, 0))
            os.chown(root / "etc" / "hostname", 1234, 5678)
    return root


def strip_end(tar: bytes, keep_zero_blocks: int) -> bytes:
    """Cut the end-of-archive zero blocks down to `keep_zero_blocks` (0 or 1)."""
    end = len(tar)
    while end >= 512 and tar[end - 512 : end] == bytes(512):
        end -= 512
    return tar[:end] + bytes(512) * keep_zero_blocks


def build_corpus(out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    tree = make_tree(out / "tree")
    short = make_tree(out / "tree-short", long_names=False, special=False)
    c: dict[str, Path] = {}

    def gnutar(name: str, *opts: str, src: Path = tree) -> Path:
        p = out / f"{name}.tar"
        _run(["tar", "-C", str(src), "-cf", str(p), *opts, "."])
        c[name] = p
        return p

    gnutar("gnu", "--format=gnu", "--sparse")
    gnutar("oldgnu", "--format=oldgnu", "--sparse")
    gnutar("posix", "--format=posix", "--sparse", "--xattrs", "--xattrs-include=*")
    gnutar("posix-sparse-0.0", "--format=posix", "--sparse", "--sparse-version=0.0")
    gnutar("posix-sparse-0.1", "--format=posix", "--sparse", "--sparse-version=0.1")
    gnutar("ustar", "--format=ustar", src=short)
    gnutar("gnu-numeric", "--format=gnu", "--numeric-owner", "--owner=0", "--group=0")

    for fmt in ("pax", "ustar"):
        p = out / f"bsdtar-{fmt}.tar"
        _run(["bsdtar", "-C", str(tree if fmt == "pax" else short), f"--format={fmt}", "-cf", str(p), "."])
        c[f"bsdtar-{fmt}"] = p

    for fmt, label in ((tarfile.GNU_FORMAT, "gnu"), (tarfile.PAX_FORMAT, "pax"), (tarfile.USTAR_FORMAT, "ustar")):
        p = out / f"pytarfile-{label}.tar"
        src = short if fmt == tarfile.USTAR_FORMAT else tree
        with tarfile.open(p, "w", format=fmt) as t:
            t.add(src, arcname=".")
        c[f"pytarfile-{label}"] = p

    # PAX global header (as `git archive` writes) followed by ordinary members
    p = out / "pax-global.tar"
    with tarfile.open(p, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "global header", "mtime": "5"}) as t:
        t.add(short, arcname="")
    c["pax-global"] = p

    # dpkg-deb: the data.tar inside a .deb
    pkg = out / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: fusesnap-corpus\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: x\n")
    (pkg / "usr" / "share" / "doc" / "fusesnap-corpus").mkdir(parents=True)
    (pkg / "usr" / "share" / "doc" / "fusesnap-corpus" / "README").write_text("corpus\n" * 50)
    os.symlink("README", pkg / "usr" / "share" / "doc" / "fusesnap-corpus" / "link")
    _run(["dpkg-deb", "--root-owner-group", "-Znone", "--build", str(pkg), str(out / "pkg.deb")])
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(out / "pkg.deb")], check=True, capture_output=True).stdout
    (out / "dpkg-data.tar").write_bytes(data)
    c["dpkg-data"] = out / "dpkg-data.tar"

    # setuptools sdist (a .tar.gz written by setuptools/tarfile)
    proj = out / "proj"
    (proj / "corpuspkg").mkdir(parents=True)
    (proj / "corpuspkg" / "__init__.py").write_text("X = 1\n")
    (proj / "setup.py").write_text(
        "from setuptools import setup\nsetup(name='corpuspkg', version='1.0', packages=['corpuspkg'])\n")
    _run([sys.executable, "setup.py", "-q", "sdist", "--formats=gztar"], cwd=proj)
    c["sdist"] = next((proj / "dist").glob("*.tar.gz"))

    base = c["gnu"].read_bytes()
    (out / "junk-after-end.tar").write_bytes(base + b"trailing junk \x00\xff" * 300)
    c["junk-after-end"] = out / "junk-after-end.tar"
    (out / "one-end-block.tar").write_bytes(strip_end(base, 1))
    c["one-end-block"] = out / "one-end-block.tar"
    (out / "no-end-blocks.tar").write_bytes(strip_end(base, 0))
    c["no-end-blocks"] = out / "no-end-blocks.tar"

    # compressed inputs: detected by magic, not by name
    (out / "gzip-named.tar").write_bytes(gzip.compress(c["posix"].read_bytes()))
    c["gzip"] = out / "gzip-named.tar"
    _run(["zstd", "-q", "-f", str(c["oldgnu"]), "-o", str(out / "zstd-layer.bin")])
    c["zstd"] = out / "zstd-layer.bin"
    # duplicate member: a later file replaces an earlier one at the same path
    dup = io.BytesIO()
    with tarfile.open(fileobj=dup, mode="w", format=tarfile.GNU_FORMAT) as t:
        for content in (b"first version\n", b"second, longer version\n"):
            ti = tarfile.TarInfo("etc/config")
            ti.size = len(content)
            t.addfile(ti, io.BytesIO(content))
        ti = tarfile.TarInfo("etc/config-link")
        ti.type = tarfile.LNKTYPE
        ti.linkname = "etc/config"
        t.addfile(ti)
    (out / "duplicate.tar").write_bytes(dup.getvalue())
    c["duplicate"] = out / "duplicate.tar"
    shutil.rmtree(pkg)
    return c
