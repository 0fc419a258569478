"""Lookup/readdir merge of upper over lowers: layer order, both whiteout
forms, every opaque marker, markers never visible, and readdir's d_type, '.'/'..', no duplicates,
stable offsets while entries change.

Kernel overlayfs only knows char 0/0 whiteouts and trusted.overlay.opaque (user.overlay.* only with
`userxattr`); the `.wh.*` file forms and the user.* opaque xattrs are asserted on fusesnap only.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest

from helpers import is_root
from unionmount import (KINDS, Union, errno_of, getdents, is_opaque_in_upper, layout, mkdir, mkfile, mkwhiteout, mount_union,
                        read_all_dents, scratch)

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root to mount and to build whiteouts")

OPAQUE_CASES = {
    # name: (marker in lower l0 or in upper, understood by kernel overlayfs)
    "trusted": True,
    "upper_trusted": True,
    "markfile": False,
    "upper_markfile": False,
    "useroverlay": False,
    "fuseoverlay": False,
}
RD_LOWER2 = [f"n{i:03d}" for i in range(0, 200)]
RD_LOWER1 = [f"n{i:03d}" for i in range(100, 300)]
RD_UPPER = [f"u{i:03d}" for i in range(50)]
RD_WHITED = [f"n{i:03d}" for i in range(0, 300, 7)]


def _build(lowers: list[Path], upper: Path) -> None:
    l0, l1, l2 = lowers
    # layer order: l0 is the uppermost lower
    for i, layer in enumerate((l0, l1, l2)):
        mkfile(layer / "merge" / "a", f"l{i}-a")
    mkfile(l1 / "merge" / "b", "l1-b")
    mkfile(l2 / "merge" / "b", "l2-b")
    mkfile(l2 / "merge" / "c", "l2-c")
    mkfile(upper / "merge" / "c", "upper-c")
    mkfile(l2 / "merge" / "only2", "2")
    mkfile(l0 / "merge" / "only0", "0")
    mkfile(l2 / "merge" / "sub" / "x", "x")
    mkfile(l1 / "merge" / "sub" / "y", "y")
    mkfile(l2 / "merge" / "filedir", "a file below")
    mkdir(l1 / "merge" / "filedir")  # a dir in a higher layer replaces a file below
    mkfile(l1 / "merge" / "filedir" / "inside", "i")
    mkfile(l2 / "merge" / "dirfile" / "below", "b")
    mkfile(upper / "merge" / "dirfile", "a file in the upper hides a dir below")

    # char 0/0 whiteouts, in a lower layer and in the upper
    mkfile(l2 / "whk" / "gone_by_lower", "x")
    mkwhiteout(l1 / "whk" / "gone_by_lower")
    mkfile(l2 / "whk" / "gone_by_upper", "x")
    mkwhiteout(upper / "whk" / "gone_by_upper")
    mkfile(l2 / "whk" / "gonedir" / "f", "x")
    mkwhiteout(l0 / "whk" / "gonedir")
    mkfile(l2 / "whk" / "kept", "k")

    # .wh.NAME whiteout files (OCI layer form), in a lower and in the upper
    mkfile(l2 / "whf" / "gone_by_lower", "x")
    mkfile(l1 / "whf" / ".wh.gone_by_lower")
    mkfile(l2 / "whf" / "gone_by_upper", "x")
    mkfile(upper / "whf" / ".wh.gone_by_upper")
    mkfile(l2 / "whf" / "gonedir" / "f", "x")
    mkfile(l0 / "whf" / ".wh.gonedir")
    mkfile(l2 / "whf" / "kept", "k")

    for name in OPAQUE_CASES:
        mkfile(l2 / "opq" / name / "hidden", "h")
        mkfile(l1 / "opq" / name / "hidden2", "h")
    for name, where in (("trusted", l0), ("useroverlay", l0), ("fuseoverlay", l0), ("markfile", l0),
                        ("upper_trusted", upper), ("upper_markfile", upper)):
        mkfile(where / "opq" / name / "mine", "m")
    os.setxattr(l0 / "opq" / "trusted", "trusted.overlay.opaque", b"y")
    os.setxattr(upper / "opq" / "upper_trusted", "trusted.overlay.opaque", b"y")
    os.setxattr(l0 / "opq" / "useroverlay", "user.overlay.opaque", b"y")
    os.setxattr(l0 / "opq" / "fuseoverlay", "user.fuseoverlayfs.opaque", b"y")
    mkfile(l0 / "opq" / "markfile" / ".wh..wh..opq")
    mkfile(upper / "opq" / "upper_markfile" / ".wh..wh..opq")

    # every file type, split over two layers so that the dir is merged
    t2, t1 = l2 / "types", l1 / "types"
    mkfile(t2 / "reg", "r")
    mkdir(t2 / "dir")
    os.symlink("reg", t2 / "lnk")
    mkdir(t1)
    os.mkfifo(t1 / "fifo")
    os.mknod(t1 / "chr", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    os.mknod(t1 / "blk", stat.S_IFBLK | 0o644, os.makedev(7, 0))
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(t1 / "sock"))
    s.close()

    for raw in (b"caf\xe9", b"new\nline", b"back\\slash", b"co:lon", b" lead", b"\xff\xfe"):
        (l2 / "bytes").mkdir(exist_ok=True)
        with open(os.path.join(os.fsencode(l2 / "bytes"), raw), "wb") as fh:
            fh.write(raw)
    for name in RD_LOWER2:
        mkfile(l2 / "rd" / name, name)
        mkfile(l2 / "rd2" / name, name)
    for name in RD_LOWER1:
        mkfile(l1 / "rd" / name, name)
        mkfile(l1 / "rd2" / name, name)
    for name in RD_UPPER:
        mkfile(upper / "rd" / name, name)
        mkfile(upper / "rd2" / name, name)
    for name in RD_WHITED:
        mkwhiteout(upper / "rd" / name)
        mkwhiteout(upper / "rd2" / name)


@pytest.fixture(scope="module", params=KINDS)
def u(request):
    with scratch() as base:
        lowers, upper, work, mnt = layout(base, 3)
        _build(lowers, upper)
        un = mount_union(request.param, mnt, lowers, upper, work)
        yield un
        un.unmount()


def _ls(p: Path) -> list[str]:
    return sorted(os.listdir(p))


def test_upper_over_lowers_in_order(u: Union):
    m = u.p("merge")
    assert _ls(m) == ["a", "b", "c", "dirfile", "filedir", "only0", "only2", "sub"]
    assert (m / "a").read_text() == "l0-a"
    assert (m / "b").read_text() == "l1-b"
    assert (m / "c").read_text() == "upper-c"
    assert _ls(m / "sub") == ["x", "y"]
    assert (m / "filedir").is_dir() and _ls(m / "filedir") == ["inside"]
    assert (m / "dirfile").read_text().startswith("a file in the upper")
    assert errno_of(os.lstat, m / "dirfile" / "below") == errno.ENOTDIR


def test_char_whiteouts_hide_names_below(u: Union):
    w = u.p("whk")
    assert _ls(w) == ["kept"]
    for name in ("gone_by_lower", "gone_by_upper", "gonedir"):
        assert errno_of(os.lstat, w / name) == errno.ENOENT, name


def test_dot_wh_files_hide_names_below_and_are_never_visible(u: Union):
    u.only_fusesnap("kernel overlayfs does not understand .wh.NAME files (it shows them as files)")
    w = u.p("whf")
    assert _ls(w) == ["kept"]
    for name in ("gone_by_lower", "gone_by_upper", "gonedir", ".wh.gone_by_lower", ".wh.gone_by_upper",
                 ".wh.gonedir"):
        assert errno_of(os.lstat, w / name) == errno.ENOENT, name


@pytest.mark.parametrize("case", list(OPAQUE_CASES))
def test_opaque_markers_hide_lower_contents(u: Union, case: str):
    if not OPAQUE_CASES[case]:
        why = ("a .wh..wh..opq file is an OCI tar convention, not a kernel marker" if "markfile" in case
               else "without `userxattr` the kernel ignores user.* opaque xattrs")
        u.only_fusesnap(f"{why} ({case})")
    d = u.p("opq", case)
    assert _ls(d) == ["mine"]
    assert errno_of(os.lstat, d / "hidden") == errno.ENOENT
    assert errno_of(os.lstat, d / ".wh..wh..opq") == errno.ENOENT
    shown = os.listxattr(d)
    assert not [x for x in shown if x.startswith(("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs."))], shown


def test_readdir_reports_d_type_dots_and_inode_numbers(u: Union):
    d = u.p("types")
    (d / "ureg").write_text("u")  # and the same types created through the mount
    os.mkdir(d / "udir")
    os.symlink("ureg", d / "ulnk")
    os.mkfifo(d / "ufifo")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ents = read_all_dents(fd)
    finally:
        os.close(fd)
    names = [e.name for e in ents]
    assert sorted(names) == [".", "..", "blk", "chr", "dir", "fifo", "lnk", "reg", "sock", "udir", "ufifo",
                             "ulnk", "ureg"]
    want = {".": stat.S_IFDIR, "..": stat.S_IFDIR, "reg": stat.S_IFREG, "dir": stat.S_IFDIR,
            "lnk": stat.S_IFLNK, "fifo": stat.S_IFIFO, "chr": stat.S_IFCHR, "blk": stat.S_IFBLK,
            "sock": stat.S_IFSOCK, "ureg": stat.S_IFREG, "udir": stat.S_IFDIR, "ulnk": stat.S_IFLNK,
            "ufifo": stat.S_IFIFO}
    for e in ents:
        assert e.dtype << 12 == want[e.name], f"{e.name}: d_type {e.dtype}"
        if e.name not in (".", ".."):
            assert e.ino == os.lstat(d / e.name).st_ino, f"{e.name}: d_ino != st_ino"
    assert next(e for e in ents if e.name == ".").ino == os.stat(d).st_ino
    root = os.open(u.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert sorted(e.name for e in read_all_dents(root) if e.name in (".", "..")) == [".", ".."]
    finally:
        os.close(root)


def _expected_rd() -> set[str]:
    return (set(RD_LOWER2) | set(RD_LOWER1) | set(RD_UPPER)) - set(RD_WHITED)


def test_marker_xattrs_cannot_be_set_to_change_the_merge(u: Union):
    """Setting an opaque marker through the mount must not hide the lower contents."""
    m = u.p("merge", "sub")
    for name in ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque"):
        if name != "trusted.overlay.opaque":
            u.only_fusesnap("kernel overlayfs (without userxattr) treats user.overlay.* as plain xattrs")
        try:
            os.setxattr(m, name, b"y")
        except OSError:
            pass  # refusing is fine
        assert _ls(m) == ["x", "y"], name
        up = u.up("merge", "sub")
        assert not (up.exists() and is_opaque_in_upper(up)), f"{name} reached the upper: opaque after remount"


def test_names_are_bytes_not_text(u: Union):
    """Names that are not UTF-8 (or hold newlines, backslashes, colons) work like any other."""
    d = os.fsencode(u.p("bytes"))
    j = lambda name: os.path.join(d, name)  # noqa: E731
    names = {b"caf\xe9", b"new\nline", b"back\\slash", b"co:lon", b" lead", b"\xff\xfe"}
    assert set(os.listdir(d)) == names
    for raw in names:
        with open(j(raw), "rb") as fh:
            assert fh.read() == raw
    with open(j(b"made\x80here"), "wb") as fh:
        fh.write(b"m")
    os.rename(j(b"caf\xe9"), j(b"\xe9t\xe9"))
    os.unlink(j(b"\xff\xfe"))
    os.mkdir(j(b"dir\xa0"))
    os.symlink(b"\xe9t\xe9", j(b"ln\xe9"))
    assert os.readlink(j(b"ln\xe9")) == b"\xe9t\xe9"
    assert set(os.listdir(d)) == names - {b"caf\xe9", b"\xff\xfe"} | {b"made\x80here", b"\xe9t\xe9", b"dir\xa0",
                                                                      b"ln\xe9"}
    assert errno_of(os.lstat, j(b"caf\xe9")) == errno.ENOENT


def test_readdir_of_big_merged_dir_has_no_duplicates(u: Union):
    fd = os.open(u.p("rd"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        names = [e.name for e in read_all_dents(fd, 1024) if e.name not in (".", "..")]  # many small calls
    finally:
        os.close(fd)
    assert len(names) == len(set(names)), "duplicate entries"
    assert set(names) == _expected_rd()


def test_readdir_offsets_can_be_resumed(u: Union):
    fd = os.open(u.p("rd"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        first = read_all_dents(fd, 1024)
        for k in (0, 5, len(first) // 2, len(first) - 2):
            os.lseek(fd, first[k].off, os.SEEK_SET)  # seekdir(telldir()) after entry k
            again = read_all_dents(fd, 1024)
            assert [e.name for e in again] == [e.name for e in first[k + 1:]], f"resume after entry {k}"
        os.lseek(fd, 0, os.SEEK_SET)  # rewinddir
        assert [e.name for e in read_all_dents(fd)] == [e.name for e in first]
    finally:
        os.close(fd)


def test_readdir_is_stable_while_entries_are_added_and_removed(u: Union):
    d = u.p("rd2")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seen = [e.name for e in getdents(fd, 1024)]
        assert seen
        rest_expected = sorted(_expected_rd() - set(seen))
        removed = set(rest_expected[::5])  # not yet returned, some from each layer
        for name in removed:
            os.unlink(d / name)
        added = {f"new{i:03d}" for i in range(40)}
        for name in added:
            (d / name).write_text(name)
        while chunk := getdents(fd, 1024):
            seen.extend(e.name for e in chunk)
    finally:
        os.close(fd)
    real = [n for n in seen if n not in (".", "..")]
    assert len(real) == len(set(real)), "an entry was returned twice"
    untouched = _expected_rd() - removed
    missing = untouched - set(real)
    assert not missing, f"entries neither added nor removed were skipped: {sorted(missing)[:10]}"
    assert set(real) <= _expected_rd() | added
    assert set(os.listdir(d)) == (_expected_rd() - removed) | added
