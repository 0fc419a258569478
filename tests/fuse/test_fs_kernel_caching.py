"""The kernel caches directory listings, symlink targets and file pages of a fusesnap-overlay
mount (pyfuse3 patches 0002-0006, third_party/pyfuse3/README.md): a second readdir of an
unchanged directory and a second readlink of a symlink never reach the daemon, directories and
files are opened by the kernel itself (one OPENDIR and one OPEN answered ENOSYS per mount, then
none), so a warm walk or a warm read of an unchanged tree sends no request at all, and every
change made through the mount is seen at once. Big listings come as plain READDIR where only
names are read. A file system written for stock pyfuse3 keeps the old uncached behaviour.

Requests are counted in the daemon itself: the mount program runs with fusesnap's Operations
handlers wrapped so that each call appends a line to a log (a call = a request that reached
the daemon; the kernel sends READDIRPLUS for every readdir and pyfuse3 maps it to readdir)."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from stat import S_ISDIR

import pytest

from helpers import is_root, unmount, wait_mounted
from unionmount import FUSESNAP, Union, layout, mkdir, mkfile, mount_union, scratch

pytestmark = pytest.mark.skipif(not is_root(), reason="needs root to mount")

# fusesnap-overlay with its request handlers counted (FUSESNAP_COUNT_LOG names the log).
COUNTING_OVERLAY = r'''
import os, sys
import fusesnap.fs.fuse.operations as fo

LOG = os.environ["FUSESNAP_COUNT_LOG"]

def counted(name, orig):
    async def wrapper(self, *args):
        with open(LOG, "a") as f:
            f.write(f"{name} {args[0]}\n")
            if name == "readdir" and not getattr(args[2], "plus", True):
                f.write(f"readdir-plain {args[0]}\n")
        return await orig(self, *args)
    return wrapper

for name in ("opendir", "readdir", "releasedir", "readlink", "lookup", "getattr", "open",
             "release", "flush", "read", "write", "setattr", "create", "mknod", "getxattr", "listxattr",
             "statfs"):
    setattr(fo.Operations, name, counted(name, getattr(fo.Operations, name)))

if "FUSESNAP_ATTRS_IN_LISTING" in os.environ:
    fo.ATTRS_IN_LISTING = int(os.environ["FUSESNAP_ATTRS_IN_LISTING"])

from fusesnap.cli.overlay import main
sys.exit(main())
'''

# A file system written against stock pyfuse3: opendir returns an int, no enable_symlink_cache.
STOCK_STYLE_FS = r'''
import errno, stat, sys
import pyfuse3, trio

MNT, LOG = sys.argv[1], sys.argv[2]

def note(what):
    with open(LOG, "a") as f:
        f.write(what + " 0\n")

class StockStyle(pyfuse3.Operations):
    def _attr(self, ino):
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = stat.S_IFDIR | 0o755 if ino == pyfuse3.ROOT_INODE else stat.S_IFLNK | 0o777
        a.st_nlink = 2 if ino == pyfuse3.ROOT_INODE else 1
        a.st_size = 0 if ino == pyfuse3.ROOT_INODE else len(b"target")
        a.entry_timeout = a.attr_timeout = 300
        return a

    async def getattr(self, ino, ctx=None):
        return self._attr(ino)

    async def lookup(self, parent, name, ctx=None):
        if name != b"s":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(2)

    async def opendir(self, ino, ctx):
        note("opendir")
        return 7

    async def readdir(self, fh, start_id, token):
        note("readdir")
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"s", self._attr(2), 1)

    async def readlink(self, ino, ctx):
        note("readlink")
        return b"target"

pyfuse3.init(StockStyle(), MNT, {"fsname=stockstyle"})
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=False)
'''


class Requests:
    """Counts, per handler, of the calls logged by the daemon."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def __call__(self) -> Counter[str]:
        if not self.log.exists():
            return Counter()
        return Counter(line.split()[0] for line in self.log.read_text().splitlines())


def count_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Requests:
    """Have the next fusesnap-overlay mount log its requests; returns their counter."""
    prog = tmp_path / "counting_overlay.py"
    prog.write_text(COUNTING_OVERLAY)
    log = tmp_path / "requests.log"
    monkeypatch.setenv("FUSESNAP_OVERLAY_PROG", f"{sys.executable} {prog}")
    monkeypatch.setenv("FUSESNAP_COUNT_LOG", str(log))
    return Requests(log)


BIG_DIR_ENTRIES = 3000


@pytest.fixture(params=[False])
def counted_mount(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fusesnap-overlay mount (two lowers, upper) whose daemon logs its requests;
    parametrized True, the first lower also holds big/ with BIG_DIR_ENTRIES files + sub/
    (a string: that too, mounted with the string as an extra option)."""
    requests = count_requests(tmp_path, monkeypatch)
    extra = [request.param] if isinstance(request.param, str) else []
    with scratch("fusesnap-kcache-") as base:
        (l0, l1), upper, work, mnt = layout(base, 2)
        mkfile(l0 / "d" / "a", b"a")
        mkfile(l0 / "d" / "b", b"b")
        mkfile(l1 / "d" / "c", b"c")
        mkdir(l1 / "links")
        os.symlink("t1", l1 / "links" / "s")
        if request.param:         # True or an option
            big = l0 / "big"
            big.mkdir()
            for k in range(BIG_DIR_ENTRIES):
                (big / f"entry-with-a-longer-name-{k:05d}").write_bytes(b"x" * (k % 7))
            (big / "sub").mkdir()
        u = mount_union(FUSESNAP, mnt, [l0, l1], upper, work, extra)
        try:
            yield u, requests
        finally:
            u.unmount()


def test_unchanged_directory_is_listed_from_the_kernel_cache(counted_mount: tuple[Union, Requests]) -> None:
    u, requests = counted_mount
    d = u.p("d")
    assert sorted(os.listdir(d)) == ["a", "b", "c"]
    first = requests()
    assert first["opendir"] >= 1 and first["readdir"] >= 1, first

    assert sorted(os.listdir(d)) == ["a", "b", "c"]
    second = requests()
    assert second["opendir"] == first["opendir"] == 1, "directories are opened by the kernel"
    assert second["readdir"] == first["readdir"], "the second readdir reached the daemon"

    # Changes through the mount are seen at once (and the new listing is cached again).
    (d / "new").write_bytes(b"n")
    assert sorted(os.listdir(d)) == ["a", "b", "c", "new"]
    os.unlink(d / "a")
    assert sorted(os.listdir(d)) == ["b", "c", "new"]
    os.rename(d / "c", d / "c2")
    assert sorted(os.listdir(d)) == ["b", "c2", "new"]
    os.mkdir(d / "sub")
    assert sorted(os.listdir(d)) == ["b", "c2", "new", "sub"]
    os.rmdir(d / "sub")
    assert sorted(os.listdir(d)) == ["b", "c2", "new"]
    changed = requests()
    assert changed["readdir"] > second["readdir"]
    assert sorted(os.listdir(d)) == ["b", "c2", "new"]
    assert requests()["readdir"] == changed["readdir"]


def test_symlink_target_is_read_from_the_kernel_cache(counted_mount: tuple[Union, Requests]) -> None:
    u, requests = counted_mount
    s = u.p("links", "s")
    assert os.readlink(s) == "t1"
    first = requests()["readlink"]
    assert first == 1
    assert os.readlink(s) == "t1"
    assert requests()["readlink"] == first, "the second readlink reached the daemon"

    # A new symlink under the same name is seen at once, then cached in turn.
    os.unlink(s)
    os.symlink("t2", s)
    assert os.readlink(s) == "t2"
    assert os.readlink(s) == "t2"
    os.symlink("t3", u.p("links", "tmp"))
    os.rename(u.p("links", "tmp"), s)
    assert os.readlink(s) == "t3"
    n = requests()["readlink"]
    assert n > first
    assert os.readlink(s) == "t3"
    assert requests()["readlink"] == n
    assert os.readlink(u.up("links", "s")) == "t3"


def test_stock_pyfuse3_style_filesystem_is_not_cached(tmp_path: Path) -> None:
    """Handlers written for stock pyfuse3 (int from opendir, no enable_symlink_cache) still
    get every readdir and readlink, as before the patches."""
    prog, log, mnt = tmp_path / "stock_style_fs.py", tmp_path / "requests.log", tmp_path / "mnt"
    prog.write_text(STOCK_STYLE_FS)
    mnt.mkdir()
    requests = Requests(log)
    proc = subprocess.Popen([sys.executable, str(prog), str(mnt), str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_mounted(mnt, 30)
        for i in (1, 2, 3):
            assert os.listdir(mnt) == ["s"]
            assert os.readlink(mnt / "s") == "target"
            n = requests()
            assert n["opendir"] == i and n["readlink"] == i, n
            assert n["readdir"] >= 2 * i, n   # entries, then end of directory, every time
    finally:
        unmount(mnt)
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")


def walk(top: Path) -> dict[str, tuple[int, int]]:
    """scandir + lstat of every entry below top: relative path -> (mode, size)."""
    out: dict[str, tuple[int, int]] = {}
    todo = [top]
    while todo:
        d = todo.pop()
        with os.scandir(d) as it:
            for e in it:
                st = os.lstat(e.path)
                out[os.path.relpath(e.path, top)] = (st.st_mode, st.st_size)
                if e.is_dir(follow_symlinks=False):
                    todo.append(Path(e.path))
    return out


def walk_until_silent(top: Path, requests: Requests, expect: dict[str, tuple[int, int]]) -> None:
    """After a cold walk: the next walk sends no opendir/readdir/lookup, only one GETATTR per
    directory (the kernel's uncached readdir invalidated its atime), and the one after it
    sends no request at all."""
    before = requests()
    assert walk(top) == expect
    second = requests() - before
    ndirs = 1 + sum(1 for mode, _ in expect.values() if S_ISDIR(mode))
    assert set(second) <= {"getattr"} and second["getattr"] <= ndirs, second
    third = requests()
    assert walk(top) == expect
    assert requests() == third, "a warm walk of an unchanged tree reached the daemon"


def test_warm_walk_of_an_unchanged_tree_sends_no_request(counted_mount: tuple[Union, Requests]) -> None:
    u, requests = counted_mount
    first = walk(u.mnt)
    assert {"d", "d/a", "d/b", "d/c", "links", "links/s"} <= set(first)
    cold = requests()
    assert cold["opendir"] == 1 and cold["readdir"] >= 3, cold
    walk_until_silent(u.mnt, requests, first)

    # Changes through the mount are seen by the next walk, which is then warm again.
    (u.p("d", "new")).write_bytes(b"new")
    os.unlink(u.p("d", "a"))
    os.rename(u.p("d", "c"), u.p("links", "c"))
    os.mkdir(u.p("links", "sub"))
    (u.p("links", "sub", "f")).write_bytes(b"ff")
    seen = requests()
    changed = walk(u.mnt)
    assert set(changed) == set(first) - {"d/a", "d/c"} | {"d/new", "links/c", "links/sub", "links/sub/f"}
    assert changed["d/new"][1] == 3 and changed["links/sub/f"][1] == 2
    after = requests()
    assert after["readdir"] > seen["readdir"] and after["opendir"] == 1, after
    walk_until_silent(u.mnt, requests, changed)


def _read_from(li, kids: dict, cookie: int) -> list[tuple[bytes, int]]:
    """What fusesnap's readdir returns from offset cookie + 2: live entries, with cookies."""
    cookies = li.cookies
    return [(n, idx if cookies is None else cookies[idx])
            for idx in range(li.index(cookie), len(li.ents))
            for n, i in [li.ents[idx]] if kids.get(n) is i]


def test_listing_offsets_survive_removals_additions_and_compaction() -> None:
    """Readdir has no handle, so any offset handed out may come back later: the entries of
    a directory keep their cookies through syncs, also once dead slots are dropped."""
    from fusesnap.fs.core.union import Listing

    kids = {b"f%03d" % k: object() for k in range(300)}
    li = Listing(object(), kids)  # type: ignore[arg-type]
    first = _read_from(li, kids, 0)
    assert [n for n, _ in first] == list(kids)
    pos = first[49][1] + 1                       # a reader stopped after 50 entries
    for k in range(20, 300):                     # most entries go away ...
        if k % 20:
            del kids[b"f%03d" % k]
    kids[b"f101"] = object()                     # ... one name comes back as a new object
    for k in range(10):
        kids[b"new%d" % k] = object()
    li.sync(kids)                                # a new reader starts at 0
    assert li.cookies is not None, "dead slots outnumbered live ones: compacted"
    assert len(li.ents) == len(kids)
    rest = _read_from(li, kids, pos)
    names = [n for n, _ in rest]
    assert len(names) == len(set(names))
    assert set(names) == set(kids) - {n for n, _ in first[:50]}
    kept = dict(first)
    again = _read_from(li, kids, 0)
    for n, c in again:
        if n != b"f101" and not n.startswith(b"new"):
            assert c == kept[n], f"{n!r} changed its offset"
    assert [n for n, _ in again] == [n for n, _ in first if n in kids and n != b"f101"] + \
        [b"f101"] + [b"new%d" % k for k in range(10)]


def read_all(top: Path) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, n), top): Path(d, n).read_bytes()
            for d, _, names in os.walk(top) for n in names if not Path(d, n).is_symlink()}


def test_warm_read_of_unchanged_files_sends_no_request(counted_mount: tuple[Union, Requests]) -> None:
    u, requests = counted_mount
    want = {"d/a": b"a", "d/b": b"b", "d/c": b"c"}
    assert read_all(u.mnt) == want
    cold = requests()
    assert cold["open"] <= 1 and cold["release"] == 0 and cold["flush"] <= 1, cold
    assert cold["read"] >= 3, cold
    walk(u.mnt)
    warm = requests()
    assert read_all(u.mnt) == want
    assert requests() == warm, "a warm read of unchanged files reached the daemon"

    # Writes through the mount (no OPEN: the first write copies up) are seen at once,
    # O_TRUNC arrives as a size SETATTR, and the lower stays untouched.
    with open(u.p("d", "a"), "r+b") as f:
        f.seek(1)
        f.write(b"AA")
    with open(u.p("d", "b"), "wb") as f:
        f.write(b"new b")
    with open(u.p("d", "c"), "ab") as f:
        f.write(b"+")
    after = {"d/a": b"aAA", "d/b": b"new b", "d/c": b"c+"}
    assert read_all(u.mnt) == after
    assert {k: Path(u.up(*k.split("/"))).read_bytes() for k in after} == after
    assert Path(u.lowers[0], "d", "a").read_bytes() == b"a"
    assert requests()["setattr"] > warm["setattr"]
    read_all(u.mnt)         # the writes invalidated cached attributes: one GETATTR each
    seen = requests()
    assert read_all(u.mnt) == after
    assert requests() == seen


@pytest.mark.parametrize("counted_mount", [True], indirect=True)
def test_a_walk_that_stats_what_it_lists_sends_no_lookups(counted_mount: tuple[Union, Requests]) -> None:
    """By default every listing is READDIRPLUS: a walker that reads all names before it
    stats any (find, tar, podman's diff) finds every entry's attributes in the kernel."""
    u, requests = counted_mount
    names = os.listdir(u.p("big"))
    assert len(names) == BIG_DIR_ENTRIES + 1
    listed = requests()
    for name in names:
        os.lstat(u.p("big", name))
    n = requests()
    assert n["readdir-plain"] == 0 and n["readdir"] >= 2, n
    assert n["lookup"] == listed["lookup"] and n["getattr"] == listed["getattr"], n


@pytest.mark.parametrize("counted_mount", [True], indirect=True)
def test_a_listing_gives_attributes_to_its_first_entries_only(
        counted_mount: tuple[Union, Requests], monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ATTRS_IN_LISTING entries a READDIRPLUS reply holds names only (patch 0011):
    no dentry and inode per entry of a huge listing, a LOOKUP when one is stat'ed. Once
    an entry was looked up, that directory's listings carry attributes again (`ls -l`)."""
    u, requests = counted_mount
    monkeypatch.setenv("FUSESNAP_ATTRS_IN_LISTING", "1000")
    u.remount()
    with os.scandir(u.p("big")) as it:
        ents = {e.name: (e.inode(), e.is_dir(follow_symlinks=False)) for e in it}
    assert len(ents) == BIG_DIR_ENTRIES + 1
    listed = requests()
    for name, (ino, is_dir) in ents.items():
        st = os.lstat(u.p("big", name))
        assert (st.st_ino, S_ISDIR(st.st_mode)) == (ino, is_dir), name
    n = requests() - listed
    assert n["lookup"] == BIG_DIR_ENTRIES + 1 - 1000 and listed["readdir-plain"] == 0, (listed, n)

    # The same on a fresh mount, stat'ing each entry as the listing goes.
    u.remount()
    before = requests()
    with os.scandir(u.p("big")) as it:
        for e in it:
            assert os.lstat(e.path).st_ino == e.inode()
    n = requests() - before
    assert 0 < n["lookup"] < 500 and n["readdir-plain"] == 0, n


@pytest.mark.parametrize("counted_mount", ["readdirplus=auto"], indirect=True)
def test_listing_a_big_directory_uses_plain_readdir(counted_mount: tuple[Union, Requests]) -> None:
    """readdirplus=auto, listing names only: after the first chunk the kernel asks for plain
    READDIR (no dentry and inode per entry); d_ino and d_type stay right, and stat still works."""
    u, requests = counted_mount
    names = os.listdir(u.p("big"))
    assert len(names) == BIG_DIR_ENTRIES + 1
    n = requests()
    assert n["readdir-plain"] >= 1 and n["readdir"] > n["readdir-plain"], n
    with os.scandir(u.p("big")) as it:
        ents = {e.name: (e.inode(), e.is_dir(follow_symlinks=False)) for e in it}
    for name, (ino, is_dir) in ents.items():
        st = os.lstat(u.p("big", name))
        assert (st.st_ino, S_ISDIR(st.st_mode)) == (ino, is_dir), name
        if not is_dir:
            assert st.st_size == int(name.rsplit("-", 1)[1]) % 7


# fusesnap opens new files for write-only callers FOPEN_DIRECT_IO where the kernel keeps
# other opens' cached pages coherent with such writes (Operations.direct_create).
DIRECT_CREATE = tuple(int(x) for x in os.uname().release.split(".")[:2]) >= (6, 6)


def _settled(requests: Requests, before: Counter[str], key: str, want: int) -> Counter[str]:
    """The counts once `key` reached `want` (RELEASE is sent after close() returns)."""
    for _ in range(200):
        n = requests() - before
        if n[key] >= want:
            break
        time.sleep(0.01)
    return n


def test_new_files_cost_one_create_one_write_per_write_and_one_release(
        counted_mount: tuple[Union, Requests]) -> None:
    """A write-only creator's file comes with CREATE, one WRITE per write(2) and a RELEASE
    (on kernels before 6.6: MKNOD and the kernel's own open, no RELEASE); O_EXCL and a mode
    without write permission behave as on any filesystem."""
    u, requests = counted_mount
    before = requests()
    for k in range(20):
        fd = os.open(u.p("d", f"new{k}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            assert os.write(fd, b"n%d" % k) == len(b"n%d" % k)
        finally:
            os.close(fd)
    if DIRECT_CREATE:
        n = _settled(requests, before, "release", 20)
        assert n["create"] == 20 and n["mknod"] == 0 and n["release"] == 20 and n["write"] == 20, n
    else:
        n = requests() - before
        assert n["mknod"] == 20 and n["create"] <= 1 and n["release"] == 0 and n["open"] <= 1, n
    try:
        os.open(u.p("d", "new3"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        raise AssertionError("O_EXCL on an existing file succeeded")
    except FileExistsError:
        pass
    for k in range(20):
        host = os.stat(u.up("d", f"new{k}"))
        assert Path(u.up("d", f"new{k}")).read_bytes() == b"n%d" % k
        assert host.st_mode & 0o777 == 0o444


@pytest.mark.skipif(not DIRECT_CREATE, reason="write-only creators keep the page cache before Linux 6.6")
def test_writes_of_a_new_file_arrive_one_per_write_however_they_align(
        counted_mount: tuple[Union, Requests]) -> None:
    """tar writes 10 KiB records: through the page cache every write(2) that starts inside
    a page not cached yet became two WRITEs."""
    u, requests = counted_mount
    before = requests()
    fd = os.open(u.p("d", "records"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for k in range(16):
            assert os.write(fd, bytes([k]) * 10240) == 10240
    finally:
        os.close(fd)
    assert (requests() - before)["write"] == 16
    assert u.p("d", "records").read_bytes() == b"".join(bytes([k]) * 10240 for k in range(16))
    # appenders (logs someone may tail) and readers-writers keep the page cache
    before = requests()
    for name, flags in (("log", os.O_WRONLY | os.O_APPEND), ("rw", os.O_RDWR)):
        fd = os.open(u.p("d", name), flags | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for k in range(4):
                os.write(fd, b"x" * 10240)
        finally:
            os.close(fd)
    assert (requests() - before)["write"] > 8


def test_readers_see_what_a_new_file_s_writer_writes(counted_mount: tuple[Union, Requests]) -> None:
    """A reader's cached pages and its mapping follow writes through the creator's fd."""
    u, _ = counted_mount
    p = u.p("d", "shared")
    w = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    r = os.open(p, os.O_RDONLY)
    try:
        os.write(w, b"A" * 8192)
        assert os.pread(r, 8192, 0) == b"A" * 8192          # the reader caches both pages
        with mmap.mmap(r, 8192, prot=mmap.PROT_READ) as m:
            assert m[:4] == b"AAAA"
            os.pwrite(w, b"B" * 4096, 0)
            assert os.pread(r, 4, 0) == b"BBBB" and m[:4] == b"BBBB"
            os.write(w, b"C" * 100)                         # past the old end
            assert os.pread(r, 200, 8192) == b"C" * 100
            assert os.fstat(r).st_size == 8292
    finally:
        os.close(r)
        os.close(w)
    assert p.read_bytes() == b"B" * 4096 + b"A" * 4096 + b"C" * 100
