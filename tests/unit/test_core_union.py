"""Union logic (copy-up, whiteouts, renames, inode numbers) driven without a mount."""

from __future__ import annotations

import errno
import os
import stat
from types import SimpleNamespace

import pytest

from fusesnap.fs.core.lowertree import lower_tree_from_dirs
from fusesnap.fs.options import MountOptions
from fusesnap.fs.core.union import Ctx, Union


@pytest.fixture
def env(tmp_path):
    low, up = tmp_path / "low", tmp_path / "up"
    (low / "d" / "sub").mkdir(parents=True)
    (low / "d" / "f").write_bytes(b"lower-f")
    (low / "big").write_bytes(b"B" * 10000)
    os.link(low / "big", low / "d" / "biglink")
    os.symlink("d/f", low / "sl")
    up.mkdir()
    u = Union(lower_tree_from_dirs([low]), up, None, MountOptions())
    return SimpleNamespace(u=u, low=low, up=up, root=u.root, ctx=Ctx(os.geteuid(), os.getegid()))


def walk(u, d=None, prefix=b""):
    d = d or u.root
    out = {}
    for name, i in sorted(u.kids(d).items()):
        p = prefix + name
        out[p] = i
        if i.is_dir:
            out.update(walk(u, i, p + b"/"))
    return out


def test_lookup_merges_and_inode_numbers_come_from_the_lower_tree(env):
    u = env.u
    d = u.lookup(env.root, b"d")
    assert sorted(u.kids(d)) == [b"biglink", b"f", b"sub"]
    big, biglink = u.lookup(env.root, b"big"), u.lookup(d, b"biglink")
    assert big is biglink and u.attr(big).st_nlink == 2
    assert u.lookup(env.root, b"missing") is None
    with pytest.raises(OSError) as e:
        u.lookup(env.root, b"x" * 256)
    assert e.value.errno == errno.ENAMETOOLONG


def test_copy_up_keeps_inode_and_links_every_name_of_a_lower_hard_link_group(env):
    u = env.u
    big = u.lookup(env.root, b"big")
    ino = big.ino
    fd = u.open(big, os.O_RDWR)
    os.pwrite(fd, b"x", 0)
    assert big.ino == ino and big.upper
    a, b = os.stat(env.up / "big"), os.stat(env.up / "d" / "biglink")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert (env.up / "d" / "biglink").read_bytes()[:2] == b"xB"
    assert (env.low / "big").read_bytes()[:1] == b"B"          # lower untouched
    assert stat.S_IMODE(os.stat(env.up / "d").st_mode) == stat.S_IMODE(os.stat(env.low / "d").st_mode)


def test_unlink_of_lower_name_whites_out_without_copying_data(env):
    u = env.u
    u.unlink(env.root, b"big")
    st = os.lstat(env.up / "big")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert not (env.up / "d").exists()                          # nothing copied
    d = u.lookup(env.root, b"d")
    assert u.attr(u.lookup(d, b"biglink")).st_nlink == 1
    assert u.lookup(env.root, b"big") is None


def test_rmdir_of_merged_dir_that_looks_empty_and_mkdir_over_whiteout_is_opaque(env):
    u = env.u
    d = u.lookup(env.root, b"d")
    for n in (b"f", b"biglink"):
        u.unlink(d, n)
    u.rmdir(d, b"sub")
    with pytest.raises(OSError):
        u.rmdir(env.root, b"sl")
    u.rmdir(env.root, b"d")
    assert stat.S_ISCHR(os.lstat(env.up / "d").st_mode)
    nd = u.mkdir(env.root, b"d", 0o755, env.ctx)
    assert u.kids(nd) == {}
    assert os.getxattr(env.up / "d", "trusted.overlay.opaque" if os.geteuid() == 0
                       else "user.fuseoverlayfs.opaque") == b"y"
    # a fresh mount over the same upper sees the same thing
    u2 = Union(u.tree, env.up, None, MountOptions())
    assert u2.kids(u2.lookup(u2.root, b"d")) == {}


def test_rename_of_lower_directory_copies_subtree_and_is_a_plain_diff(env):
    u = env.u
    before = {p: i.ino for p, i in walk(u).items() if p.startswith(b"d/")}
    u.rename(env.root, b"d", env.root, b"e")
    after = {p: i.ino for p, i in walk(u).items()}
    assert {b"e/" + p[2:]: ino for p, ino in before.items()} == {p: ino for p, ino in after.items() if p.startswith(b"e/")}
    assert stat.S_ISCHR(os.lstat(env.up / "d").st_mode)
    assert (env.up / "e" / "f").read_bytes() == b"lower-f"
    # the whole group stays linked: big (root) and e/biglink
    assert os.stat(env.up / "big").st_ino == os.stat(env.up / "e" / "biglink").st_ino
    u2 = Union(u.tree, env.up, None, MountOptions())
    assert sorted(u2.kids(u2.lookup(u2.root, b"e"))) == [b"biglink", b"f", b"sub"]
    assert u2.lookup(u2.root, b"d") is None


def test_rename_flags_and_errors(env):
    u = env.u
    u.create(env.root, b"n", 0o600, os.O_WRONLY, env.ctx)
    with pytest.raises(OSError) as e:
        u.rename(env.root, b"n", env.root, b"big", 1)           # RENAME_NOREPLACE
    assert e.value.errno == errno.EEXIST
    with pytest.raises(OSError) as e:
        u.rename(env.root, b"n", env.root, b"d")
    assert e.value.errno == errno.EISDIR
    with pytest.raises(OSError) as e:
        u.rename(env.root, b"d", u.lookup(env.root, b"d"), b"x")
    assert e.value.errno == errno.EINVAL
    n_ino, sl_ino = u.lookup(env.root, b"n").ino, u.lookup(env.root, b"sl").ino
    u.rename(env.root, b"n", env.root, b"sl", 2)                # RENAME_EXCHANGE
    assert u.lookup(env.root, b"sl").ino == n_ino and u.lookup(env.root, b"n").ino == sl_ino
    assert os.readlink(env.up / "n") == "d/f"


def test_create_over_whiteout_and_read_only_union(env, tmp_path):
    u = env.u
    u.unlink(env.root, b"big")
    fd, i, _st = u.create(env.root, b"big", 0o640, os.O_WRONLY, env.ctx)
    os.write(fd, b"new")
    assert (env.up / "big").read_bytes() == b"new"
    assert stat.S_IMODE(u.attr(i).st_mode) == 0o640
    ro = Union(u.tree, None, None, MountOptions())
    with pytest.raises(OSError) as e:
        ro.unlink(ro.root, b"sl")
    assert e.value.errno == errno.EROFS


def test_xattrs_hide_internal_names(env):
    u = env.u
    d = u.lookup(env.root, b"d")
    u.setxattr(d, b"user.k", b"v")
    assert u.getxattr(d, b"user.k") == b"v"
    with pytest.raises(OSError):
        u.setxattr(d, b"trusted.overlay.opaque", b"y")
    u.rename(env.root, b"d", env.root, b"e")
    e = u.lookup(env.root, b"e")
    assert b"user.k" in u.listxattr(e)
    assert not any(n.startswith((b"trusted.overlay", b"user.fuseoverlayfs")) for n in u.listxattr(e))


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to other ids needs root")
def test_uid_mapping_keeps_on_disk_ids_through_copy_up_and_chown(tmp_path):
    from fusesnap.fs.options import parse_options
    low, up = tmp_path / "low", tmp_path / "up"
    low.mkdir()
    up.mkdir()
    (low / "f").write_bytes(b"x")
    os.chown(low / "f", 0, 0)
    opts = parse_options(["uidmapping=0:1000:10,gidmapping=0:2000:10"])
    u = Union(lower_tree_from_dirs([low]), up, None, opts)
    f = u.lookup(u.root, b"f")
    a = u.attr(f)
    assert (a.st_uid, a.st_gid) == (1000, 2000)
    u.open(f, os.O_WRONLY)
    st = os.lstat(up / "f")
    assert (st.st_uid, st.st_gid) == (0, 0), "copy-up must keep the on-disk owner"
    fields = SimpleNamespace(update_size=False, update_uid=True, update_gid=False, update_mode=False,
                             update_atime=False, update_mtime=False)
    u.setattr(f, SimpleNamespace(st_uid=1003), fields)
    st = os.lstat(up / "f")
    assert (st.st_uid, st.st_gid) == (3, 0)
    assert (u.attr(f).st_uid, u.attr(f).st_gid) == (1003, 2000)


async def test_request_errors_keep_their_errno(env, caplog):
    """Handlers answer an unknown inode with ESTALE, a host error with its errno, a bug with EIO."""
    import pyfuse3

    from fusesnap.fs.fuse.operations import Operations

    ops = Operations(env.u)
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.getattr(999_999)
    assert e.value.errno == errno.ESTALE
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.lookup(env.root.ino, b"x" * 256)
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(pyfuse3.FUSEError) as e:
        f = env.u.lookup(env.u.lookup(env.root, b"d"), b"f")
        os.unlink(env.low / "d" / "f")          # a lower broken behind our back
        await ops.read(f.ino, 0, 10)            # ENOENT from the host
    assert e.value.errno == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as e:
        await ops.mkdir(env.root.ino, b"n", 0o755, None)   # no ctx: a bug, not a crash
    assert e.value.errno == errno.EIO
    assert "internal error" in caplog.text


def test_a_lazy_tree_counts_a_looked_up_directory_and_merges_a_listed_ones_subdirectories(tmp_path):
    """Over plain directories (the fuse-overlayfs front end) a stat of a directory in
    several layers counts its subdirectories without merging it; listing its parent
    merges it instead, as a walker lists it next. Link counts agree either way."""
    from fusesnap.fs.core.lazytree import _KIDS, LazyLowerTree
    a, b, up = tmp_path / "a", tmp_path / "b", tmp_path / "up"
    for layer, sub in ((a, "x"), (b, "y")):
        (layer / "d" / sub).mkdir(parents=True)
        (layer / "e" / sub).mkdir(parents=True)
    up.mkdir()
    u = Union(LazyLowerTree([a, b]), up, None, MountOptions())
    d = u.lookup(u.root, b"d")
    assert u.attr(d).st_nlink == 4 and _KIDS.__get__(d.lower) is None
    u.listing(u.root, True)
    e = u.lookup(u.root, b"e")
    assert u.attr(e).st_nlink == 4 and _KIDS.__get__(e.lower) is not None
