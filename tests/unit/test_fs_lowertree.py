"""The merged lower tree, options and upper-format readers: plain Python, no mount."""

from __future__ import annotations

import os
import stat

import pytest

from fusesnap.errors import InvalidInput
from fusesnap.fs.core import upperformat as uf
from fusesnap.fs.core.lower import IndexLower
from fusesnap.fs.core.lowertree import LowerTree, build_lower_tree, lower_tree_from_dirs
from fusesnap.fs.options import IdMap, parse_options, split_lowerdir
from fusesnap.layerentry import LayerEntry


def E(path: bytes, kind="reg", mode=0o644, **kw) -> LayerEntry:
    kw.setdefault("uid", 0)
    kw.setdefault("gid", 0)
    kw.setdefault("mtime_ns", 1_000_000_000)
    return LayerEntry(path=path, kind=kind, mode=mode, **kw)


def names(tree: LowerTree, path: bytes = b"") -> list[bytes]:
    return sorted(tree.lookup(path).kids)


def test_whiteouts_and_opaque_markers_hide_lower_entries_and_never_show(tmp_path):
    base = IndexLower([E(b"d", "dir", 0o755), E(b"d/a"), E(b"d/b"), E(b"o", "dir", 0o755),
                       E(b"o/x"), E(b"keep")], tmp_path)
    top = IndexLower([E(b"d/.wh.a"), E(b"o/.wh..wh..opq"), E(b"o/y"),
                      E(b"keep2", "chr", devmajor=0, devminor=0), E(b".wh.keep")], tmp_path)
    t = build_lower_tree([top, base])
    assert names(t) == [b"d", b"o"]
    assert names(t, b"d") == [b"b"]
    assert names(t, b"o") == [b"y"]


def test_opaque_xattr_on_a_directory_entry_hides_only_lower_layers(tmp_path):
    base = IndexLower([E(b"o", "dir", 0o755), E(b"o/old")], tmp_path)
    top = IndexLower([E(b"o", "dir", 0o700, xattrs={b"user.overlay.opaque": b"y", b"user.a": b"1"}),
                      E(b"o/new")], tmp_path)
    t = build_lower_tree([top, base])
    o = t.lookup(b"o")
    assert sorted(o.kids) == [b"new"]
    assert o.mode == stat.S_IFDIR | 0o700
    assert o.xattrs == {b"user.a": b"1"}          # internal marker hidden


def test_index_metadata_is_presented_and_hard_links_share_one_node(tmp_path):
    entries = [E(b"bin", "dir", 0o755), E(b"bin/su", mode=0o4755, uid=0, gid=0, size=3, data=b"x/su"),
               E(b"bin/su2", "hard", linkname=b"bin/su"), E(b"dev", "dir", 0o755),
               E(b"dev/null", "chr", 0o666, devmajor=1, devminor=3), E(b"l", "sym", 0o777, linkname=b"bin/su")]
    t = build_lower_tree([IndexLower(entries, tmp_path)])
    su, su2 = t.lookup(b"bin/su"), t.lookup(b"bin/su2")
    assert su is su2 and su.nlink == 2 and su.mode == stat.S_IFREG | 0o4755
    assert su.src == os.fsencode(tmp_path) + b"/x/su"
    assert sorted(t.links[su.ino]) == [b"bin/su", b"bin/su2"]
    null = t.lookup(b"dev/null")
    assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
    assert t.lookup(b"l").target == b"bin/su"
    assert t.root.nlink == 4 and t.lookup(b"bin").nlink == 2


def test_dirlower_reads_host_tree_overrides_and_hard_links(tmp_path):
    low = tmp_path / "low"
    (low / "d").mkdir(parents=True)
    (low / "d" / "f").write_bytes(b"data")
    os.link(low / "d" / "f", low / "g")
    (low / "h").write_bytes(b"")
    os.setxattr(low / "h", b"user.containers.override_stat", b"0:0:04755")
    t = lower_tree_from_dirs([low])
    assert t.lookup(b"d/f") is t.lookup(b"g") and t.lookup(b"g").nlink == 2
    h = t.lookup(b"h")
    assert (h.uid, h.gid, h.mode) == (0, 0, stat.S_IFREG | 0o4755) and not h.xattrs


def test_save_load_and_overlay_agree_with_a_full_build(tmp_path):
    l1 = IndexLower([E(b"a", "dir", 0o755), E(b"a/x", size=1), E(b"a/y", "hard", linkname=b"a/x")], tmp_path)
    l2 = IndexLower([E(b"a/.wh.x"), E(b"b", "sym", 0o777, linkname=b"a/y"), E(b"c", xattrs={b"user.k": b"v"})], tmp_path)
    full = build_lower_tree([l2, l1])
    step = build_lower_tree([l1]).overlay(l2)
    p = tmp_path / "tree.cache"
    step.save(p)
    loaded = LowerTree.load(p)

    def dump(t):
        out = []
        for ino, n in enumerate(t.by_ino[1:], 1):
            out.append((ino, n.mode, n.uid, n.size, n.nlink, n.target, n.src, n.xattrs,
                        sorted(n.kids) if n.kids is not None else None))
        return out
    assert dump(full) == dump(step) == dump(loaded)
    assert full.lookup(b"a/y").nlink == 1
    (tmp_path / "bad").write_bytes(b"junk")
    with pytest.raises(InvalidInput):
        LowerTree.load(tmp_path / "bad")


def test_overlay_leaves_the_parent_tree_untouched(tmp_path):
    base = build_lower_tree([IndexLower([E(b"f")], tmp_path)])
    child = base.overlay(IndexLower([E(b".wh.f"), E(b"g")], tmp_path))
    assert names(base) == [b"f"] and names(child) == [b"g"]


def test_unsafe_paths_are_rejected(tmp_path):
    with pytest.raises(InvalidInput):
        build_lower_tree([IndexLower([E(b"a/../../etc")], tmp_path)])


def test_options_parse_fuse_overlayfs_vocabulary(tmp_path, capsys):
    os.chdir(tmp_path)
    o = parse_options(["lowerdir=l/a\\:b:/abs,,upperdir=u,workdir=w,,volatile,ro,timeout=5,"
                       "uidmapping=:0:1000:1:1:100000:65536,squash_to_uid=7,xattr_permissions=2,"
                       "static_nlink,noxattrs,dev,suid,frobnicate,"])
    assert o.lowerdirs == [str(tmp_path / "l/a:b"), "/abs"]
    assert o.upperdir == str(tmp_path / "u") and o.read_only and o.timeout == 5
    assert o.uidmap.to_presented(0) == 1000 and o.uidmap.to_host(100005) == 6
    assert o.squash_uid == 7 and o.xattr_permissions == 2 and o.static_nlink and o.noxattrs
    assert o.fuse_options == ["dev", "suid"] and not o.fsync
    assert "frobnicate" in capsys.readouterr().err
    assert split_lowerdir("a::b") == ["a", "b"]
    with pytest.raises(InvalidInput):
        IdMap.parse("1:2", "uidmapping")
    assert not o.readdirplus_auto
    assert parse_options(["readdirplus=auto"]).readdirplus_auto
    assert not parse_options(["readdirplus=auto,readdirplus=always"]).readdirplus_auto
    with pytest.raises(InvalidInput, match="readdirplus"):
        parse_options(["readdirplus=sometimes"])


def test_override_stat_format_round_trips():
    v = uf.format_override(0, 5, 0o4755)
    assert v == b"0:5:04755"
    o = uf.parse_override(v)
    assert (o.uid, o.gid, o.mode, o.fmt) == (0, 5, 0o4755, None)
    c = uf.parse_override(uf.format_override(1, 2, 0o600, stat.S_IFCHR, os.makedev(4, 5)))
    assert c.fmt == stat.S_IFCHR and c.rdev == os.makedev(4, 5)
    assert uf.parse_override(b"garbage") is None
    assert uf.whiteout_target(b".wh.x") == b"x" and uf.whiteout_target(b".wh..wh..opq") is None
    assert uf.whiteout_target(b"x", stat.S_IFCHR, 0) == b"x"
    assert uf.visible_xattrs({b"trusted.overlay.opaque": b"y", b"user.a": b"b",
                              b"user.containers.override_stat": b"1:1:0644"}) == {b"user.a": b"b"}


def test_lazy_tree_over_directories_matches_the_eager_build(tmp_path):
    from fusesnap.fs.core.lazytree import LazyLowerTree
    top, mid, bot = tmp_path / "top", tmp_path / "mid", tmp_path / "bot"
    for d in (top, mid, bot):
        d.mkdir()
    (bot / "d" / "x").mkdir(parents=True)
    (bot / "d" / "f").write_bytes(b"b")
    (bot / "o" / "gone").mkdir(parents=True)
    (bot / "t").mkdir()
    (bot / "h1").write_bytes(b"h")
    os.link(bot / "h1", bot / "d" / "h2")
    (mid / "d").mkdir()
    (mid / "d" / ".wh.f").write_bytes(b"")
    (mid / "o").mkdir()
    os.setxattr(mid / "o", b"user.overlay.opaque", b"y")
    (mid / "o" / "kept").write_bytes(b"m")
    (mid / "t").write_bytes(b"file hides dir")
    (top / "d").mkdir()
    os.mknod(top / "d" / "x", stat.S_IFCHR | 0o600, 0) if os.geteuid() == 0 else (top / "d" / ".wh.x").write_bytes(b"")
    (top / "new").write_bytes(b"n")
    # a dir above, a whiteout of it in the middle, more of it below: the middle whiteout ends the merge
    (top / "w").mkdir()
    os.mknod(mid / "w", stat.S_IFCHR | 0o600, 0) if os.geteuid() == 0 else (mid / ".wh.w").write_bytes(b"")
    (bot / "w").mkdir()
    (bot / "w" / "leak").write_bytes(b"must not show")
    layers = [top, mid, bot]
    eager, lazy = lower_tree_from_dirs(layers), LazyLowerTree(layers)

    def shape(node, depth=0):
        if not stat.S_ISDIR(node.mode):
            return (node.mode, node.size, node.nlink, node.target)
        return (node.mode, node.nlink, {k: shape(v) for k, v in sorted(node.kids.items())})
    assert shape(lazy.root) == shape(eager.root)
    assert lazy.lookup(b"w").kids == {}
    assert lazy.lookup(b"h1") is lazy.lookup(b"d/h2")
    assert sorted(lazy.link_paths(lazy.lookup(b"h1"))) == [b"d/h2", b"h1"]
    assert lazy.max_ino >= len(eager.by_ino) - 1


@pytest.mark.parametrize("seed", range(25))
def test_a_merged_directory_counts_its_subdirectories_without_merging(tmp_path, seed):
    """A stat of a directory over several layers needs its link count: counted from
    names and types (LazyLowerTree.subdir_count), equal to what the merge gives, and
    the directory stays unmerged; in a listed directory (LazyDir.listed) it comes
    from the merge (random layers: files over directories and back, whiteouts of
    both kinds, opaque markers and xattrs, symlinks and fifos)."""
    import random

    from fusesnap.fs.core.lazytree import _KIDS, LazyLowerTree
    rnd = random.Random(seed)
    layers = [tmp_path / f"l{i}" for i in range(4)]
    pool = [f"n{i}" for i in range(12)]      # sparse: lower layers often add new names
    for layer in layers:
        for top in ("a", "b", "c"):
            if rnd.random() < 0.2:
                continue
            d = layer / top
            d.mkdir(parents=True)
            if rnd.random() < 0.15:
                (d / ".wh..wh..opq").write_bytes(b"")
            if rnd.random() < 0.1:
                os.setxattr(d, b"user.overlay.opaque", b"y")
            for name in pool:
                p, r = d / name, rnd.random()
                if r < 0.2:
                    p.mkdir()
                elif r < 0.3:
                    p.write_bytes(b"f")
                elif r < 0.38:
                    (d / f".wh.{name}").write_bytes(b"")
                elif r < 0.43 and os.geteuid() == 0:
                    os.mknod(p, stat.S_IFCHR | 0o600, 0)
                elif r < 0.47:
                    os.symlink("x", p)
                elif r < 0.5:
                    os.mkfifo(p)
    layers = [p for p in layers if p.exists()] or [tmp_path]
    counted, merged = LazyLowerTree(layers), LazyLowerTree(layers)
    merged.root.listed()        # a listing's subdirectories get their counts from merges
    for top in counted.root.kids:
        c, m = counted.lookup(top), merged.lookup(top)
        if not stat.S_ISDIR(c.mode):
            continue
        n, nm = c.nlink, m.nlink
        assert _KIDS.__get__(c) is None, "counting merged the directory"
        assert _KIDS.__get__(m) is not None, "a listed directory's subdirectory was not merged"
        assert n == nm == 2 + sum(1 for k in m.kids.values() if stat.S_ISDIR(k.mode)), (seed, top)
