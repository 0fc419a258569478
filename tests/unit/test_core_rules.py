"""The union core's rules, driven in-process on plain directories (no mount, no kernel).

Each collaborator of fs/core is reached through `Union`, the way the FUSE layer
reaches it, with plain attribute records and a plain caller context.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import sys
from types import SimpleNamespace

import pytest

from fusesnap.fs.core import upperformat as uf
from fusesnap.fs.core.attrs import Attr
from fusesnap.fs.core.ids import IdView
from fusesnap.fs.core.lowertree import lower_tree_from_dirs
from fusesnap.fs.core.permissions import Permissions, owner_group_other_may, root_may
from fusesnap.fs.core.union import Ctx, Union
from fusesnap.fs.options import MountOptions, parse_options
from helpers import run_as, user_env

ROOT = os.geteuid() == 0


def fields(**set_: bool) -> SimpleNamespace:
    names = ("update_size", "update_uid", "update_gid", "update_mode", "update_atime", "update_mtime")
    return SimpleNamespace(**{n: set_.get(n[7:], False) for n in names})


@pytest.fixture
def env(tmp_path):
    low, up = tmp_path / "low", tmp_path / "up"
    (low / "etc").mkdir(parents=True)
    (low / "etc" / "motd").write_bytes(b"hello\n")
    os.chmod(low / "etc" / "motd", 0o644)
    (low / "bin").mkdir()
    (low / "bin" / "tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(low / "bin" / "tool", 0o4755)
    os.utime(low / "etc", ns=(1_000_000_000, 1_000_000_000))
    up.mkdir()
    u = Union(lower_tree_from_dirs([low]), up, None, MountOptions())
    return SimpleNamespace(u=u, low=low, up=up, ctx=Ctx(os.geteuid(), os.getegid(), 0, os.getpid()))


def path(u: Union, p: bytes):
    i = u.root
    for part in p.split(b"/"):
        i = u.lookup(i, part)
        assert i is not None, p
    return i


# ---------------------------------------------------------------- attribute records
def test_attributes_are_plain_records_by_default_and_of_the_callers_class_when_asked(env):
    u = env.u
    a = u.attr(path(u, b"etc/motd"))
    assert isinstance(a, Attr) and a.st_size == 6 and stat.S_IMODE(a.st_mode) == 0o644

    class Mine(Attr):
        pass
    u.use_attr_record(Mine)
    assert isinstance(u.attr(path(u, b"etc/motd")), Mine)       # cached lower records were dropped
    neg = u.negative_attr()
    assert neg.st_ino == 0 and neg.entry_timeout == u.timeout


def test_lower_attributes_are_computed_once(env):
    u = env.u
    i = path(u, b"etc/motd")
    assert u.attr(i) is u.attr(i)


# ---------------------------------------------------------------- copy-up
def test_copy_up_keeps_mode_times_and_leaves_the_parents_times(env):
    u = env.u
    f = path(u, b"etc/motd")
    etc_mtime = u.attr(path(u, b"etc")).st_mtime_ns
    before = u.attr(f).st_mtime_ns
    u.copy_up(f)
    st = os.lstat(env.up / "etc" / "motd")
    assert st.st_mtime_ns == before and stat.S_IMODE(st.st_mode) == 0o644
    assert os.lstat(env.up / "etc").st_mtime_ns == etc_mtime == 1_000_000_000
    assert (env.up / "etc" / "motd").read_bytes() == b"hello\n"


def test_copy_up_in_two_steps_is_what_the_fuse_layer_runs_in_a_thread(env):
    u = env.u
    f = path(u, b"etc/motd")
    job = u.begin_copy_up(f)
    assert job is not None and not f.upper and job.size == 6
    os.write(job.dst_fd, b"HELLO\n")            # the data step, done elsewhere
    u.finish_copy_up(job)
    assert f.upper and (env.up / "etc" / "motd").read_bytes() == b"HELLO\n"


def test_aborted_copy_up_leaves_nothing_behind(env):
    u = env.u
    f = path(u, b"etc/motd")
    job = u.begin_copy_up(f)
    u.abort_copy_up(job)
    assert not f.upper and not (env.up / "etc" / "motd").exists()
    assert [p.name for p in (env.up / "etc").iterdir()] == []


# ---------------------------------------------------------------- writes and the setuid rules
def test_write_copies_nothing_by_itself_and_kills_setuid_when_asked(env):
    u = env.u
    t = path(u, b"bin/tool")
    u.copy_up(t)
    assert stat.S_IMODE(u.attr(t).st_mode) == 0o4755
    assert u.write(t, 0, b"#!", kill_suidgid=False) == 2
    assert stat.S_IMODE(u.attr(t).st_mode) == 0o4755
    u.write(t, 0, b"#!", kill_suidgid=True)
    assert stat.S_IMODE(u.attr(t).st_mode) == 0o755


def test_truncate_to_zero_of_a_lower_file_copies_no_data(env):
    u = env.u
    f = path(u, b"etc/motd")
    attr = SimpleNamespace(st_size=0)
    assert not u.setattr_copies_data(f, attr, fields(size=True))
    u.setattr(f, attr, fields(size=True))
    assert os.lstat(env.up / "etc" / "motd").st_size == 0 and u.attr(f).st_size == 0


def test_chown_drops_setuid_even_to_the_same_owner(env):
    u = env.u
    t = path(u, b"bin/tool")
    a = u.attr(t)
    u.setattr(t, SimpleNamespace(st_uid=a.st_uid, st_gid=a.st_gid), fields(uid=True, gid=True))
    assert stat.S_IMODE(u.attr(t).st_mode) == 0o755


def test_writeback_flush_of_an_unchanged_lower_mtime_is_no_change(tmp_path):
    low, up = tmp_path / "low", tmp_path / "up"
    low.mkdir()
    up.mkdir()
    (low / "f").write_bytes(b"x")
    u = Union(lower_tree_from_dirs([low]), up, None, parse_options(["writeback=1"]))
    f = u.lookup(u.root, b"f")
    same = SimpleNamespace(st_mtime_ns=u.attr(f).st_mtime_ns)
    assert u.setattr_is_noop(f, same, fields(mtime=True))
    assert not u.setattr_is_noop(f, SimpleNamespace(st_mtime_ns=1), fields(mtime=True))
    assert not u.setattr_is_noop(f, same, fields(mtime=True, mode=True))


# ---------------------------------------------------------------- names
def test_whiteouts_and_opaque_directories_survive_a_new_union_over_the_same_upper(env):
    u = env.u
    u.unlink(path(u, b"etc"), b"motd")
    for n in list(u.kids(path(u, b"bin"))):
        u.unlink(path(u, b"bin"), n)
    u.rmdir(u.root, b"bin")
    u.mkdir(u.root, b"bin", 0o755, env.ctx)
    again = Union(u.tree, env.up, None, MountOptions())
    assert again.lookup(path(again, b"etc"), b"motd") is None
    assert again.kids(path(again, b"bin")) == {}                 # opaque: the lower tool is gone
    assert uf.is_opaque(os.fsencode(env.up / "bin"))


def test_names_longer_than_name_max_are_refused(env):
    u = env.u
    with pytest.raises(OSError) as e:
        u.mkdir(u.root, b"n" * 256, 0o755, env.ctx)
    assert e.value.errno == errno.ENAMETOOLONG


def test_listing_cookies_stay_valid_across_changes(env):
    u = env.u
    etc = path(u, b"etc")
    for n in (b"a", b"b", b"c"):
        u.create(etc, n, 0o644, os.O_WRONLY, env.ctx)
    li = u.listing(etc, True)
    names = [n for n, _ in li.ents]
    cookie_of_c = names.index(b"c")
    u.unlink(etc, b"a")
    u.create(etc, b"d", 0o644, os.O_WRONLY, env.ctx)
    li = u.listing(etc, True)
    live = [n for n, i in li.ents[li.index(cookie_of_c):] if u.kids(etc).get(n) is i]
    assert live[0] == b"c" and b"d" in live and b"a" not in live


# ---------------------------------------------------------------- presented owners without root
def test_a_narrow_mode_goes_to_the_host_for_real_only_where_the_daemon_is_root(env):
    u = env.u
    fd, f, _ = u.create(u.root, b"g", 0o644, os.O_WRONLY, env.ctx)
    u.setattr(f, SimpleNamespace(st_mode=0o400), fields(mode=True))
    host = stat.S_IMODE(os.lstat(env.up / "g").st_mode)
    assert stat.S_IMODE(u.attr(f).st_mode) == 0o400
    assert host == (0o400 if ROOT else 0o600)
    if not ROOT:       # the presented mode is in the override xattr, the daemon keeps rw
        assert uf.parse_override(os.getxattr(env.up / "g", uf.OVERRIDE_XATTR)).mode == 0o400


# ---------------------------------------------------------------- id mapping
def test_id_view_maps_squashes_and_maps_back():
    v = IdView(parse_options(["uidmapping=0:1000:10,gidmapping=0:2000:10"]))
    assert (v.shown_uid(3), v.shown_gid(3)) == (1003, 2003)
    assert v.host(1003, 2003) == (3, 3)
    assert v.shown_uid(50) == 65534                 # outside the map: overflow id
    s = IdView(parse_options(["squash_to_uid=5,squash_to_gid=6"]))
    assert (s.shown_uid(0), s.shown_gid(0)) == (5, 6) and s.mapped(0, 0) == (0, 0)
    assert IdView(MountOptions()).plain


# ---------------------------------------------------------------- the access rule
def test_permission_rule_for_a_private_rootless_mount():
    private = Permissions(euid=1001, allow_other=False, asked=False)
    assert not private.kernel_checks and private.acts_as_root(1001) and not private.acts_as_root(1002)
    none = lambda: ()  # noqa: E731
    # root of the view: read/write anything, execute only with an execute bit
    assert private.may(stat.S_IFREG | 0o000, 0, 0, os.R_OK | os.W_OK, 1001, 1001, none)
    assert not private.may(stat.S_IFREG | 0o644, 0, 0, os.X_OK, 1001, 1001, none)
    assert private.may(stat.S_IFDIR | 0o000, 0, 0, os.X_OK, 1001, 1001, none)
    # anyone else (only with allow_other, where the kernel checks anyway): owner, group, other
    assert not private.may(stat.S_IFREG | 0o640, 0, 42, os.R_OK, 1002, 1002, none)
    assert private.may(stat.S_IFREG | 0o640, 0, 42, os.R_OK, 1002, 1002, lambda: (42,))
    for kernel in (Permissions(0, False, False), Permissions(1001, True, False), Permissions(1001, False, True)):
        assert kernel.kernel_checks and not kernel.acts_as_root(1001)


def test_permission_primitives():
    assert root_may(0o100, os.X_OK) and not root_may(0o644, os.X_OK) and root_may(0, os.R_OK | os.W_OK)
    assert owner_group_other_may(0o604, 5, 6, os.R_OK, 5, 0, lambda: ())
    assert not owner_group_other_may(0o404, 5, 6, os.W_OK, 5, 0, lambda: ())
    assert owner_group_other_may(0o004, 5, 6, os.R_OK, 7, 8, lambda: ())


def test_access_through_the_union_uses_presented_attributes(env):
    u = env.u
    ctx = Ctx(os.geteuid() + 1 if not ROOT else 4242, 4242, 0, 0)
    motd = path(u, b"etc/motd")
    assert u.may_access(motd, os.R_OK, ctx, lambda: ()) is True
    assert u.may_access(motd, os.W_OK, ctx, lambda: ()) is (ctx.uid == u.attr(motd).st_uid)


# ---------------------------------------------------------------- read-only views
def test_every_change_to_a_read_only_view_is_erofs(env):
    ro = Union(env.u.tree, None, None, MountOptions())
    motd = path(ro, b"etc/motd")
    for change in (lambda: ro.unlink(path(ro, b"etc"), b"motd"),
                   lambda: ro.mkdir(ro.root, b"x", 0o755, env.ctx),
                   lambda: ro.setxattr(motd, b"user.a", b"b"),
                   lambda: ro.setattr(motd, SimpleNamespace(st_mode=0o600), fields(mode=True)),
                   lambda: ro.open(motd, os.O_WRONLY)):
        with pytest.raises(OSError) as e:
            change()
        assert e.value.errno == errno.EROFS
    assert os.pread(ro.read_fd(motd), 5, 0) == b"hello"


@pytest.mark.rootless
def test_the_same_rules_hold_for_a_daemon_without_root(shared_tmp, test_user):
    """This module again, as the unprivileged user (with the installed package): the
    branches a daemon without root takes (override xattrs, owner bits kept) run for real."""
    if not ROOT:
        pytest.skip("already running without root")
    shutil.copy(__file__, shared_tmp / "test_core_rules_copy.py")
    shutil.copy(os.path.join(os.path.dirname(__file__), os.pardir, "helpers.py"), shared_tmp / "helpers.py")
    r = run_as(test_user, [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-x",
                           "-k", "not without_root", "--rootdir", str(shared_tmp),
                           str(shared_tmp / "test_core_rules_copy.py")],
               env=user_env(test_user), cwd=str(shared_tmp), timeout=120)
    out = (r.stdout + r.stderr).decode()
    assert r.returncode == 0, out[-3000:]
    assert " passed" in out and "failed" not in out
