"""The packed lower tree (store mounts) merges layers exactly as LowerTree does: seeded random
layer stacks built both ways give the same paths, attributes, hard-link groups and source
files; a saved tree loads back equal; overlay() equals building the whole stack."""

from __future__ import annotations

import random
import stat
from pathlib import Path

import pytest

from fusesnap.fs.core.lower import IndexLower
from fusesnap.fs.core.lowertree import LowerTree, build_lower_tree
from fusesnap.fs.core.packedtree import PackedTree, TreeBuilder, build_packed_tree
from fusesnap.layerentry import LayerEntry


def random_layer(rnd: random.Random, below: list[bytes], n: int) -> list[LayerEntry]:
    """A valid layer: unique paths, hard links to earlier files of the same layer, whiteouts and
    opaque markers for things below."""
    out: list[LayerEntry] = []
    files: list[bytes] = []
    dirs: list[bytes] = [b""]
    used: set[bytes] = set()
    if rnd.random() < 0.2:
        out.append(LayerEntry(b".", "dir", rnd.choice((0o755, 0o700)), 0, 0, rnd.randrange(10**9)))
    for i in range(n):
        parent = rnd.choice(dirs)
        name = rnd.choice((b"a", b"b", b"c", b"d", b"e", b"f%d" % i))
        path = parent + b"/" + name if parent else name
        if path in used or any(path.startswith(u + b"/") for u in used if u not in dirs):
            continue
        kind = rnd.choices(("dir", "reg", "sym", "chr", "hard", "wh", "opq", "opqx"), (20, 35, 8, 3, 8, 10, 3, 3))[0]
        meta = dict(uid=rnd.choice((0, 1000)), gid=rnd.choice((0, 42)), mtime_ns=rnd.randrange(10**18))
        if kind == "dir":
            out.append(LayerEntry(path, "dir", rnd.choice((0o755, 0o700, 0o1777)), **meta,
                                  xattrs={b"user.x": b"1"} if rnd.random() < 0.1 else {}))
            dirs.append(path)
        elif kind == "opqx":
            out.append(LayerEntry(path, "dir", 0o755, **meta, xattrs={b"trusted.overlay.opaque": b"y"}))
            dirs.append(path)
        elif kind == "reg":
            data = rnd.choice((path, b"../shadow/%d" % i))
            out.append(LayerEntry(path, "reg", rnd.choice((0o644, 0o4755)), **meta, size=rnd.randrange(5000),
                                  data=data))
            files.append(path)
        elif kind == "sym":
            out.append(LayerEntry(path, "sym", 0o777, **meta, linkname=b"../" + name))
        elif kind == "chr":
            out.append(LayerEntry(path, "chr", 0o666, **meta, devmajor=1, devminor=rnd.randrange(1, 9)))
        elif kind == "hard" and files:
            out.append(LayerEntry(path, "hard", 0o644, **meta, linkname=rnd.choice(files)))
        elif kind == "wh" and below:
            t = rnd.choice(below)
            p, _, nm = t.rpartition(b"/")
            out.append(LayerEntry((p + b"/" if p else b"") + b".wh." + nm, "reg", 0, 0, 0, 0))
        elif kind == "opq" and len(dirs) > 1:
            out.append(LayerEntry(rnd.choice(dirs[1:]) + b"/.wh..wh..opq", "reg", 0, 0, 0, 0))
        else:
            continue
        used.add(path)
    return out


def flatten(t) -> tuple[dict, set]:
    nodes: dict[bytes, tuple] = {}
    stack = [(b"", t.root)]
    while stack:
        path, n = stack.pop()
        src = n.src if stat.S_ISREG(n.mode) else None
        nodes[path] = (n.mode, n.uid, n.gid, n.size if not n.is_dir() else 0, n.mtime_ns, n.rdev,
                       n.nlink, n.target, n.xattrs or None, src,
                       tuple(sorted(n.kids)) if n.is_dir() else None)
        if n.is_dir():
            for name, k in n.kids.items():
                stack.append((path + b"/" + name if path else name, k))
    links = {frozenset(v) for v in t.links.values()}
    return nodes, links


def stack(seed: int, layers: int, tmp: Path) -> list[IndexLower]:
    rnd = random.Random(seed)
    out: list[IndexLower] = []
    below: list[bytes] = []
    for i in range(layers):
        entries = random_layer(rnd, below, rnd.randrange(5, 60))
        below += [e.path for e in entries if not e.path.rsplit(b"/", 1)[-1].startswith(b".wh.")]
        out.append(IndexLower(entries, tmp / f"l{i}"))
    return out[::-1]  # top-most first, like lowerdir=


@pytest.mark.parametrize("seed", range(40))
def test_packed_tree_equals_lower_tree(tmp_path, seed):
    lowers = stack(seed, 1 + seed % 6, tmp_path)
    ref = build_lower_tree(lowers)
    got = build_packed_tree(lowers)
    assert flatten(got) == flatten(ref)
    assert got.max_ino == ref.max_ino


def test_save_load_and_overlay(tmp_path):
    lowers = stack(99, 6, tmp_path)
    whole = build_packed_tree(lowers)
    below = build_packed_tree(lowers[1:])
    below.save(tmp_path / "below")
    loaded = LowerTree.load(tmp_path / "below")
    assert isinstance(loaded, PackedTree) and flatten(loaded) == flatten(below)
    assert flatten(loaded.overlay(lowers[0])) == flatten(whole)
    # nodes are shared per inode while held: the union compares them by identity
    n = whole.lookup(sorted(whole.root.kids)[0])
    assert whole.lookup(sorted(whole.root.kids)[0]) is n
    rebuilt = TreeBuilder.from_packed(whole).pack()
    assert flatten(rebuilt) == flatten(whole)


def test_a_damaged_cache_file_is_one_error(tmp_path):
    t = build_packed_tree(stack(3, 2, tmp_path))
    t.save(tmp_path / "c")
    data = (tmp_path / "c").read_bytes()
    (tmp_path / "c").write_bytes(data[: len(data) // 2])
    from fusesnap.errors import InvalidInput

    with pytest.raises(InvalidInput):
        PackedTree.load(tmp_path / "c")
