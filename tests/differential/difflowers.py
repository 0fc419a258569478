"""Seeded random lower layers for the differential test, and their merged (expected) view.

A lower spec is plain JSON data (so a failing case can be saved and replayed even
after the generator changes): a list of layers, top-most first, each a list of
entries relative to the seed's root directory:

    {"path": "a/b", "kind": "dir"|"reg"|"link"|"symlink"|"fifo"|"chr"|"whiteout",
     "mode": 0o644, "uid": 0, "gid": 0, "mtime": ns, "xattrs": {"user.x": "hex"},
     "data": [seed, length] (reg), "target": "..." (symlink target / link source),
     "opaque": bool (dir), "rdev": [major, minor] (chr)}

The same logical layers are written in different notations: the kernel only
understands char-device 0/0 whiteouts and ``trusted.overlay.opaque``; the FUSE
targets also get ``.wh.NAME`` files, ``.wh..wh..opq`` files and the user.*
opaque xattrs, chosen at random per marker (seeded), so both notations are
exercised over identical logical content.
"""

from __future__ import annotations

import os
import random
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Entry = dict[str, Any]
Spec = list[list[Entry]]  # layers, top-most first

NAMES = ["a", "b", "c", "d", "e", "f", "g"]
XATTR_NAMES = ["user.a", "user.b", "user.long.attr.name"]
T_MIN = 978307200 * 10**9  # 2001-01-01: every seeded time lies in 2001..2010
T_MAX = 1262304000 * 10**9  # 2010-01-01
UIDS = [0, 0, 0, 1000, 1234, 65534]
# /dev/null, and a major no driver registers (open gives ENXIO): harmless if an op follows
# a symlink into one (never /dev/zero or /dev/full, which read forever)
DEVICES = [[1, 3], [241, 7]]

WHITEOUT_NOTATIONS = ("chr", "whfile")
OPAQUE_NOTATIONS = ("trusted", "whopq", "user.fuseoverlayfs", "user.overlay")
KERNEL_NOTATION = {"whiteout": ("chr",), "opaque": ("trusted",)}


def data_bytes(spec: list[int] | tuple[int, int]) -> bytes:
    """Deterministic content for a [seed, length] pair (shared with diffops)."""
    seed, length = spec
    return random.Random(seed).randbytes(length)


def rand_time(rng: random.Random) -> int:
    return rng.randrange(T_MIN, T_MAX)


def rand_xattrs(rng: random.Random) -> dict[str, str]:
    out: dict[str, str] = {}
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
        out[rng.choice(XATTR_NAMES)] = rng.randbytes(rng.choice([0, 3, 17, 40])).hex()
    return out


def rand_data(rng: random.Random) -> list[int]:
    r = rng.random()
    if r < 0.1:
        n = 0
    elif r < 0.85:
        n = rng.randrange(1, 3000)
    elif r < 0.97:
        n = rng.randrange(3000, 70000)
    else:
        n = rng.randrange(70000, 300000)
    return [rng.randrange(2**31), n]


# ---------------------------------------------------------------- merging


@dataclass
class MNode:
    """One visible object of the merged lower view."""

    kind: str
    entry: Entry
    identity: tuple[int, str] | None = None  # (layer, path of the inode's first name) for reg
    children: dict[str, "MNode"] = field(default_factory=dict)


def merge(spec: Spec) -> MNode:
    """The merged view of the lowers, following overlayfs lookup rules.

    A name is taken from the top-most layer that has it; a whiteout hides it;
    a non-directory ends the search; a directory keeps merging with the same
    path in lower layers until a layer marks it opaque or has a non-directory.
    """
    index = [{e["path"]: e for e in layer} for layer in spec]
    roots = [i for i, layer in enumerate(index) if "" in layer]
    root_entry = index[roots[0]][""]
    stack = []
    for i in roots:
        stack.append(i)
        if index[i][""].get("opaque"):
            break
    node = MNode("dir", root_entry)
    _fill(node, "", stack, index)
    return node


def _identity(index: list[dict[str, Entry]], li: int, e: Entry) -> tuple[int, str]:
    if e["kind"] == "link":
        return (li, index[li][e["target"]]["path"])
    return (li, e["path"])


def _fill(node: MNode, path: str, stack: list[int], index: list[dict[str, Entry]]) -> None:
    names: list[str] = []
    for li in stack:
        pre = path + "/" if path else ""
        for p in index[li]:
            if p.startswith(pre) and p != path and "/" not in p[len(pre):] and p:
                name = p[len(pre):]
                if name not in names:
                    names.append(name)
    for name in sorted(names):
        cpath = f"{path}/{name}" if path else name
        cstack: list[int] = []
        first: Entry | None = None
        first_li = -1
        for li in stack:
            e = index[li].get(cpath)
            if e is None:
                continue
            if e["kind"] == "whiteout":
                break
            if e["kind"] != "dir":
                if first is None:
                    first, first_li = e, li
                break
            if first is None:
                first, first_li = e, li
            cstack.append(li)
            if e.get("opaque"):
                break
        if first is None:
            continue
        if first["kind"] == "dir":
            child = MNode("dir", first)
            _fill(child, cpath, cstack, index)
        else:
            kind = "reg" if first["kind"] == "link" else first["kind"]
            meta = index[first_li][first["target"]] if first["kind"] == "link" else first
            child = MNode(kind, meta, _identity(index, first_li, first) if kind == "reg" else None)
        node.children[name] = child


def walk(node: MNode, path: str = ""):
    """(path, node) pairs of a merged view, parents before children."""
    yield path, node
    for name, child in node.children.items():
        yield from walk(child, f"{path}/{name}" if path else name)


# ---------------------------------------------------------------- generation


def generate(seed: int) -> Spec:
    """Random but seeded lower layers (top-most first) for one seed."""
    rng = random.Random(f"lowers-{seed}")
    nlayers = rng.choice([1, 2, 2, 3, 3, 3, 4])
    bottom_up: list[list[Entry]] = []
    for _ in range(nlayers):
        below = merge(list(reversed(bottom_up))) if bottom_up else None
        bottom_up.append(_gen_layer(rng, below))
    return list(reversed(bottom_up))


def _meta(rng: random.Random, kind: str) -> Entry:
    if kind == "dir":
        mode = rng.choice([0o755, 0o755, 0o700, 0o775, 0o1777, 0o2755, 0o555])
    elif kind == "reg":
        mode = rng.choice([0o644, 0o644, 0o600, 0o755, 0o444, 0o4755, 0o2711, 0o664])
    elif kind in ("fifo", "chr"):
        mode = rng.choice([0o644, 0o600, 0o666])
    else:
        mode = 0o777
    e: Entry = {"mode": mode, "uid": rng.choice(UIDS), "gid": rng.choice(UIDS), "mtime": rand_time(rng)}
    if kind in ("dir", "reg"):
        e["xattrs"] = rand_xattrs(rng)
    return e


def _gen_layer(rng: random.Random, below: MNode | None) -> list[Entry]:
    layer: dict[str, Entry] = {}
    whited: set[str] = set()
    below_paths = dict(walk(below)) if below else {}
    below_paths.pop("", None)
    below_dirs = [p for p, n in below_paths.items() if n.kind == "dir"]
    root = {"path": "", "kind": "dir", **_meta(rng, "dir")}
    root["mode"] = rng.choice([0o755, 0o755, 0o775, 0o700])
    if below is not None and rng.random() < 0.04:
        root["opaque"] = True
    layer[""] = root

    def dirs_here() -> list[str]:
        ds = [""] + [p for p, e in layer.items() if e["kind"] == "dir" and p]
        ds += [d for d in below_dirs if not _shadowed(d, layer, whited)]
        return sorted(set(ds))

    def ensure_parents(path: str) -> bool:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            e = layer.get(p)
            if e is not None:
                if e["kind"] != "dir":
                    return False
                continue
            if p in whited:
                return False
            meta = _meta(rng, "dir")
            b = below_paths.get(p)
            if b is not None and b.kind == "dir" and rng.random() < 0.6:
                meta = {k: b.entry[k] for k in ("mode", "uid", "gid", "mtime")}
                meta["xattrs"] = dict(b.entry.get("xattrs", {}))
            layer[p] = {"path": p, "kind": "dir", **meta}
        return True

    def new_path(depth_bias: float = 0.5) -> str | None:
        for _ in range(10):
            d = rng.choice(dirs_here())
            if d.count("/") >= 2 and rng.random() < 0.7:
                d = ""
            p = f"{d}/{rng.choice(NAMES)}" if d else rng.choice(NAMES)
            if rng.random() < depth_bias * 0.3 and p.count("/") < 2:
                p = f"{p}/{rng.choice(NAMES)}"
            if p in layer or p in whited or any(p.startswith(w + "/") for w in whited):
                continue
            if any(q.startswith(p + "/") for q in layer):
                continue
            return p
        return None

    n = rng.randrange(3, 14)
    for _ in range(n):
        r = rng.random()
        if r < 0.40:
            kind = "reg"
        elif r < 0.60:
            kind = "dir"
        elif r < 0.70:
            kind = "symlink"
        elif r < 0.72:
            kind = "fifo"
        elif r < 0.73:
            kind = "chr"
        elif r < 0.82:
            kind = "link"
        elif r < 0.93:
            kind = "whiteout"
        else:
            kind = "opaque"
        if kind == "whiteout":
            # Only in directories that merge with a directory below: the kernel lists
            # whiteouts of a non-merged (or opaque) lower directory in readdir.
            if below is None or root.get("opaque"):
                continue
            cands = [p for p in below_paths if p not in layer and not any(q.startswith(p + "/") for q in layer)]
            if not cands or rng.random() < 0.1:  # a whiteout that hides nothing
                d = rng.choice([""] + below_dirs)
                cands = [f"{d}/{n}" if d else n for n in NAMES]
                cands = [p for p in cands if p not in below_paths and p not in layer]
            cands = [p for p in cands if not _under_opaque(p, layer)]
            if not cands:
                continue
            p = rng.choice(cands)
            if not ensure_parents(p):
                continue
            layer[p] = {"path": p, "kind": "whiteout"}
            whited.add(p)
            continue
        if kind == "opaque":
            cands = [d for d in below_dirs if d not in layer and d not in whited]
            if not cands:
                continue
            p = rng.choice(cands)
            if not ensure_parents(p) or any(q.startswith(p + "/") for q in layer):
                continue
            layer[p] = {"path": p, "kind": "dir", **_meta(rng, "dir"), "opaque": True}
            for _ in range(rng.randrange(0, 3)):
                c = f"{p}/{rng.choice(NAMES)}"
                if c not in layer:
                    layer[c] = {"path": c, "kind": "reg", **_meta(rng, "reg"), "data": rand_data(rng)}
            continue
        if kind == "link":
            regs = [e["path"] for e in layer.values() if e["kind"] == "reg"]
            if not regs:
                continue
            p = new_path()
            if p is None or not ensure_parents(p):
                continue
            layer[p] = {"path": p, "kind": "link", "target": rng.choice(regs)}
            continue
        p = new_path()
        if p is None or not ensure_parents(p):
            continue
        e: Entry = {"path": p, "kind": kind, **_meta(rng, kind)}
        if kind == "reg":
            e["data"] = rand_data(rng)
        elif kind == "symlink":
            e["target"] = _symlink_target(rng)
        elif kind == "chr":
            e["rdev"] = rng.choice(DEVICES)
        layer[p] = e
    return sorted(layer.values(), key=lambda e: (e["path"].count("/"), e["path"]))


def _under_opaque(path: str, layer: dict[str, Entry]) -> bool:
    parts = path.split("/")[:-1]
    for i in range(len(parts) + 1):
        e = layer.get("/".join(parts[:i]))
        if e is not None and e.get("opaque"):
            return True
    return False


def _shadowed(path: str, layer: dict[str, Entry], whited: set[str]) -> bool:
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        p = "/".join(parts[:i])
        if p in whited:
            return True
        e = layer.get(p)
        if e is not None and e["kind"] != "dir":
            return True
    return False


def _symlink_target(rng: random.Random) -> str:
    """Relative targets without '..' or a leading '/': they always resolve inside the
    seed's tree wherever the link is moved, so ops that follow links stay in the mount."""
    r = rng.random()
    if r < 0.6:
        return rng.choice(NAMES)
    if r < 0.9:
        return f"{rng.choice(NAMES)}/{rng.choice(NAMES)}"
    return "nonexistent-target"


# ---------------------------------------------------------------- writing


def _set_meta(path: str, e: Entry, kind: str) -> None:
    os.chown(path, e["uid"], e["gid"], follow_symlinks=False)
    if kind != "symlink":
        os.chmod(path, e["mode"])  # after chown: chown clears setuid bits
    for k, v in e.get("xattrs", {}).items():
        os.setxattr(path, k, bytes.fromhex(v), follow_symlinks=False)


def write_layer(layer: list[Entry], dest: Path, notation: dict[str, tuple[str, ...]], rng: random.Random) -> None:
    """Write one layer into dest (the seed's root inside a lower dir)."""
    dest.mkdir(parents=True, exist_ok=True)
    dirs: list[tuple[str, Entry]] = []
    for e in sorted(layer, key=lambda e: (e["kind"] == "link", e["path"].count("/"), e["path"])):
        p = os.path.join(dest, e["path"]) if e["path"] else str(dest)
        kind = e["kind"]
        if kind == "dir":
            if e["path"]:
                os.mkdir(p)
            if e.get("opaque"):
                how = rng.choice(notation["opaque"])
                if how == "whopq":
                    open(os.path.join(p, ".wh..wh..opq"), "wb").close()
                else:
                    os.setxattr(p, f"{how}.opaque" if how != "trusted" else "trusted.overlay.opaque", b"y")
            dirs.append((p, e))
        elif kind == "reg":
            with open(p, "wb") as f:
                f.write(data_bytes(e["data"]))
            _set_meta(p, e, kind)
        elif kind == "link":
            os.link(os.path.join(dest, e["target"]), p)
        elif kind == "symlink":
            os.symlink(e["target"], p)
            _set_meta(p, e, kind)
        elif kind == "fifo":
            os.mkfifo(p)
            _set_meta(p, e, kind)
        elif kind == "chr":
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(*e["rdev"]))
            _set_meta(p, e, kind)
        elif kind == "whiteout":
            how = rng.choice(notation["whiteout"])
            if how == "chr":
                os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(0, 0))
            else:
                d, n = os.path.split(p)
                open(os.path.join(d, ".wh." + n), "wb").close()
        else:
            raise ValueError(f"unknown lower entry kind {kind!r}")
        if kind not in ("dir", "link", "whiteout"):
            os.utime(p, ns=(e["mtime"], e["mtime"]), follow_symlinks=False)
    for p, e in sorted(dirs, key=lambda x: -x[0].count("/")):
        _set_meta(p, e, "dir")
        os.utime(p, ns=(e["mtime"], e["mtime"]))


def write_merged(root: MNode, dest: Path) -> None:
    """Materialize the merged view as a plain directory: the plain-dir oracle's start state."""
    dest.mkdir(parents=True, exist_ok=True)
    first_name: dict[tuple[int, str], str] = {}
    dirs: list[tuple[str, Entry]] = []
    for path, node in walk(root):
        p = os.path.join(dest, path) if path else str(dest)
        e = node.entry
        if node.kind == "dir":
            if path:
                os.mkdir(p)
            dirs.append((p, e))
            continue
        if node.kind == "reg":
            assert node.identity is not None
            if node.identity in first_name:
                os.link(first_name[node.identity], p)
                continue
            first_name[node.identity] = p
            with open(p, "wb") as f:
                f.write(data_bytes(e["data"]))
        elif node.kind == "symlink":
            os.symlink(e["target"], p)
        elif node.kind == "fifo":
            os.mkfifo(p)
        elif node.kind == "chr":
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(*e["rdev"]))
        _set_meta(p, e, node.kind)
        os.utime(p, ns=(e["mtime"], e["mtime"]), follow_symlinks=False)
    for p, e in sorted(dirs, key=lambda x: -x[0].count("/")):
        _set_meta(p, e, "dir")
        os.utime(p, ns=(e["mtime"], e["mtime"]))


def seed_dirname(seed: int) -> str:
    return f"s{seed:06d}"


def write_lowers(
    specs: dict[int, Spec], lower_dirs: list[Path], notation: dict[str, tuple[str, ...]], salt: str
) -> None:
    """Write several seeds' layers side by side: seed k's layer j goes to lower_dirs[j]/s<k>."""
    for d in lower_dirs:
        d.mkdir(parents=True, exist_ok=True)
    for seed, spec in specs.items():
        rng = random.Random(f"notation-{salt}-{seed}")
        for j, layer in enumerate(spec):
            write_layer(layer, lower_dirs[j] / seed_dirname(seed), notation, rng)
