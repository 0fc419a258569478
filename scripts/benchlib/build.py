"""Build (once) and cache the benchmark's workloads under one directory.

Every layer exists in two forms, built from the same files:
- a directory in the kernel overlayfs format (whiteouts are 0/0 char devices,
  opaque directories carry trusted.overlay.opaque=y), used as a lowerdir by
  kernel overlayfs, fuse-overlayfs and fusesnap-overlay;
- an OCI layer tar (whiteouts as `.wh.NAME`, opaque dirs as `.wh..wh..opq`),
  imported into fusesnap's store.
A "stack" is a list of layers (bottom first) plus its merged tree copied flat,
the plain-directory baseline. Each piece is built in a `.tmp` sibling and
renamed into place, so an interrupted build is redone, never half re-used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from .sysutil import BenchError, rmtree, run, unmount

DEFAULT_CACHE = Path("/var/tmp/fusesnap-bench")
OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")
# Packages the second rootfs layer installs (small, common in container images).
EXTRA_PACKAGES = ["less", "procps", "iproute2", "ca-certificates", "curl"]


@dataclass(frozen=True)
class Scale:
    """Sizes of the synthetic workloads; "full" is the issue's list, "tiny" is for tests."""

    name: str
    rootfs: str  # "debootstrap" or "synthetic"
    big_bytes: int
    chain_layers: int
    chain_files: int  # distinct files over the whole chain
    dir_entries: int
    tree_dirs: int
    tree_files_per_dir: int
    create_files: int
    small_size: int = 4096
    many_dirs: int = 1000           # the "manyfiles" stack: many_dirs x many_per_dir small files
    many_per_dir: int = 100


SCALES = {
    "full": Scale("full", "debootstrap", 2 << 30, 100, 10_000, 100_000, 100, 100, 10_000),
    "tiny": Scale("tiny", "synthetic", 8 << 20, 10, 100, 1_000, 10, 10, 100, many_dirs=10, many_per_dir=10),
}


@dataclass
class Stack:
    """Layers (bottom..top) as lower dirs and as tars, and the flat merged copy."""

    name: str
    layers: list[str]
    tars: list[str]
    flat: str

    @property
    def lower_dirs(self) -> list[Path]:
        return [Path(p) for p in self.layers]


@dataclass
class Workset:
    """Everything built: the stacks by name, plus facts the steps need."""

    root: str
    scale: Scale
    stacks: dict[str, Stack]
    big_file: str  # path of the big file relative to a mount root
    chain_bottom_files: list[str]  # files (relative) that only the bottom chain layer holds
    rootfs_tar: str  # the tar that "untar" and "import/export" use

    def stack(self, name: str) -> Stack:
        return self.stacks[name]


def log(msg: str) -> None:
    print(f"bench: {msg}", flush=True, file=sys.stderr)


def _cached(dst: Path, builder: Callable[[Path], None]) -> Path:
    """Build dst via builder(tmp) unless a finished dst exists."""
    if dst.exists():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.is_dir() and not tmp.is_symlink():
        rmtree(tmp)  # an interrupted earlier build
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    builder(tmp)
    os.rename(tmp, dst)
    return dst


# ---------------------------------------------------------------- OCI layer tars


def _scan(root: Path, rel: str = "") -> Iterator[tuple[str, os.DirEntry]]:
    with os.scandir(root / rel if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        path = f"{rel}/{e.name}" if rel else e.name
        yield path, e
        if e.is_dir(follow_symlinks=False):
            yield from _scan(root, path)


def _xattrs(path: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for n in names:
        if n.startswith("trusted.overlay.") or n in OPAQUE_XATTRS:
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            pass
    return out


def is_opaque(path: str | Path) -> bool:
    for n in OPAQUE_XATTRS:
        try:
            if os.getxattr(path, n, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def dir_to_layer_tar(src: Path, dst: Path) -> None:
    """Write src (kernel overlay upper format) as an OCI layer tar (PAX, numeric owners)."""
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.copybufsize = 1 << 20
        for rel, e in _scan(src):
            full = os.path.join(src, rel)
            st = e.stat(follow_symlinks=False)
            parent, name = os.path.split(rel)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                ti = tarfile.TarInfo(os.path.join(parent, ".wh." + name))
                ti.mode, ti.mtime, ti.uid, ti.gid = 0o644, int(st.st_mtime), 0, 0
                tf.addfile(ti)
                continue
            ti = tf.gettarinfo(full, arcname=rel)
            if ti is None:  # socket: not representable, not part of a layer
                continue
            ti.uname = ti.gname = ""
            for k, v in _xattrs(full).items():
                ti.pax_headers["SCHILY.xattr." + k] = v.decode("utf-8", "surrogateescape")
            if ti.isreg():
                with open(full, "rb") as f:
                    tf.addfile(ti, f)
            else:
                tf.addfile(ti)
            if ti.isdir() and is_opaque(full):
                op = tarfile.TarInfo(os.path.join(rel, ".wh..wh..opq"))
                op.mode, op.mtime = 0o644, int(st.st_mtime)
                tf.addfile(op)


# ---------------------------------------------------------------- overlay helpers


def overlay_mount(lowers_top_first: list[Path], mnt: Path, upper: Path | None = None,
                  work: Path | None = None) -> None:
    opts = "lowerdir=" + ":".join(str(p) for p in lowers_top_first)
    if upper is not None and work is not None:
        opts += f",upperdir={upper},workdir={work}"
    # No redirects, metacopy or index: the upper must be a plain diff any reader understands.
    opts += ",redirect_dir=off,metacopy=off,index=off"
    run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], timeout=60)


def copy_merged(lowers_top_first: list[Path], dst: Path, scratch: Path) -> None:
    """Copy the merged view of lowers into dst as a plain directory (via kernel overlayfs)."""
    if len(lowers_top_first) == 1:
        run(["cp", "-a", f"{lowers_top_first[0]}/.", str(dst)], timeout=3600)
        return
    mnt = scratch / "merge-mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    overlay_mount(lowers_top_first, mnt)
    try:
        dst.mkdir(exist_ok=True)
        run(["cp", "-a", f"{mnt}/.", str(dst)], timeout=3600)
    finally:
        unmount(mnt)
        mnt.rmdir()


# ---------------------------------------------------------------- rootfs


def debian_mirror() -> str:
    """The Debian mirror this machine uses (first non-security bookworm source)."""
    srcs = [Path("/etc/apt/sources.list")] + sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for p in srcs:
        try:
            text = p.read_text()
        except OSError:
            continue
        if p.suffix == ".sources":
            for block in re.split(r"\n\s*\n", text):
                uris = re.search(r"^URIs:\s*(\S+)", block, re.M)
                suites = re.search(r"^Suites:\s*(.+)$", block, re.M)
                if uris and suites and "bookworm" in suites.group(1).split() and "security" not in uris.group(1):
                    return uris.group(1)
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", line + " ")
                if m and "security" not in m.group(1):
                    return m.group(1)
    return "http://deb.debian.org/debian"


def _debootstrap_base(tmp: Path, mirror: str) -> None:
    log(f"debootstrap --variant=minbase bookworm from {mirror} (a few minutes)")
    run(["debootstrap", "--variant=minbase", "bookworm", str(tmp), mirror], timeout=3600)
    # What a container base layer does not carry: device nodes, downloaded .debs, the
    # build host's resolver configuration.
    for p in (tmp / "dev").iterdir():
        rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in (tmp / "var/cache/apt/archives").glob("*.deb"):
        p.unlink()
    (tmp / "etc/resolv.conf").unlink(missing_ok=True)


def _chroot_layer(base: Path, tmp: Path) -> None:
    """Second layer: install packages and delete docs in a chroot over a kernel overlay
    mount of the base; the overlay's upper dir is the layer (real whiteouts, opaque dirs)."""
    upper, work, mnt = tmp / "upper", tmp / "work", tmp / "merged"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    overlay_mount([base], mnt, upper, work)
    mounted = [mnt]
    try:
        run(["mount", "-t", "proc", "proc", str(mnt / "proc")])
        mounted.append(mnt / "proc")
        run(["mount", "--bind", "/dev", str(mnt / "dev")])
        mounted.append(mnt / "dev")
        shutil.copy("/etc/resolv.conf", mnt / "etc/resolv.conf")
        script = (
            "set -e; export DEBIAN_FRONTEND=noninteractive LC_ALL=C; "
            "apt-get update -qq; "
            f"apt-get install -y -qq --no-install-recommends {' '.join(EXTRA_PACKAGES)} >/dev/null; "
            "apt-get clean; rm -rf /var/lib/apt/lists/*; "
            # whiteouts: delete lower files one by one; opaque dir: replace a whole dir
            "rm -rf /usr/share/man/* /usr/share/info/* /usr/share/lintian/*; "
            "rm -rf /usr/share/doc; mkdir /usr/share/doc; "
            "rm -f /etc/resolv.conf"
        )
        log(f"chroot layer: apt-get install {' '.join(EXTRA_PACKAGES)}, delete docs")
        run(["chroot", str(mnt), "/bin/sh", "-c", script], timeout=3600)
    finally:
        for m in reversed(mounted):
            unmount(m)
    rmtree(work)
    mnt.rmdir()
    # the layer dir is the upper itself
    for p in upper.iterdir():
        os.rename(p, tmp / p.name)
    upper.rmdir()


def _synthetic_base(tmp: Path) -> None:
    """A small rootfs-like tree for tiny runs (no network, seconds to build)."""
    for d in ("usr/bin", "usr/lib/x86_64-linux-gnu", "etc/apt", "var/lib/dpkg/info",
              "usr/share/man/man1", "usr/share/man/man8", "usr/share/doc", "usr/share/info", "tmp"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    os.chmod(tmp / "tmp", 0o1777)
    for i in range(40):
        (tmp / f"usr/bin/tool{i}").write_bytes(os.urandom(2000 + 37 * i))
        os.chmod(tmp / f"usr/bin/tool{i}", 0o755)
        (tmp / f"usr/lib/x86_64-linux-gnu/lib{i}.so.1").write_bytes(os.urandom(5000 + i))
        (tmp / f"var/lib/dpkg/info/pkg{i}.list").write_text(f"/usr/bin/tool{i}\n")
        (tmp / f"usr/share/man/man1/tool{i}.1.gz").write_bytes(os.urandom(300))
        doc = tmp / f"usr/share/doc/pkg{i}"
        doc.mkdir()
        (doc / "copyright").write_text(f"pkg{i} copyright\n" * 20)
    (tmp / "usr/share/info/dir").write_text("info\n")
    os.symlink("usr/bin", tmp / "bin")
    os.link(tmp / "usr/bin/tool0", tmp / "usr/bin/tool0-hardlink")
    os.chmod(tmp / "usr/bin/tool1", 0o4755)
    (tmp / "etc/apt/sources.list").write_text("deb http://deb.debian.org/debian bookworm main\n")
    busybox = shutil.which("busybox")   # busybox-static: something a container of this rootfs can run
    if busybox:
        shutil.copy(busybox, tmp / "usr/bin/true")
        os.chmod(tmp / "usr/bin/true", 0o755)


def _synthetic_layer(base: Path, tmp: Path) -> None:
    """Tiny second layer made the same way as the real one: changes through a kernel
    overlay mount of the base, whose upper becomes the layer."""
    upper, work, mnt = tmp / "upper", tmp / "work", tmp / "merged"
    for d in (upper, work, mnt):
        d.mkdir(parents=True)
    overlay_mount([base], mnt, upper, work)
    try:
        for i in range(10):
            (mnt / f"usr/bin/newtool{i}").write_bytes(os.urandom(3000))
        (mnt / "etc/apt/sources.list").write_text("deb http://deb.debian.org/debian bookworm main contrib\n")
        for p in (mnt / "usr/share/man/man1").iterdir():
            p.unlink()
        (mnt / "usr/share/info/dir").unlink()
        shutil.rmtree(mnt / "usr/share/doc")
        (mnt / "usr/share/doc").mkdir()
    finally:
        unmount(mnt)
    rmtree(work)
    mnt.rmdir()
    for p in upper.iterdir():
        os.rename(p, tmp / p.name)
    upper.rmdir()


# ---------------------------------------------------------------- synthetic stacks


def _big(tmp: Path, size: int) -> None:
    tmp.mkdir()
    block = bytearray(os.urandom(1 << 20))
    with open(tmp / "big.bin", "wb") as f:
        left, n = size, 0
        while left > 0:
            block[:8] = n.to_bytes(8, "little")  # every MiB differs
            chunk = block[: min(left, len(block))]
            f.write(chunk)
            left -= len(chunk)
            n += 1


def _chain_layer(tmp: Path, index: int, files: int) -> None:
    d = tmp / "common"
    d.mkdir(parents=True)
    for j in range(files):
        (d / f"f{index:03d}_{j:04d}").write_bytes(b"layer %d file %d\n" % (index, j))


def _dir_entries(tmp: Path, n: int) -> None:
    d = tmp / "d"
    d.mkdir(parents=True)
    for i in range(n):
        os.close(os.open(d / f"entry{i:06d}", os.O_WRONLY | os.O_CREAT, 0o644))


def _tree(tmp: Path, dirs: int, per_dir: int, size: int) -> None:
    payload = os.urandom(size)
    for i in range(dirs):
        d = tmp / "t" / f"d{i:03d}"
        d.mkdir(parents=True)
        for j in range(per_dir):
            (d / f"f{j:03d}").write_bytes(payload)


# ---------------------------------------------------------------- entry point


def _claim(root: Path, scale: Scale) -> tuple[Path, Path]:
    """Make root a cache of `scale` workloads (one scale per cache): (its tars, its scratch)."""
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "scale"
    if marker.exists() and marker.read_text().strip() != scale.name:
        raise BenchError(f"{root} holds {marker.read_text().strip()!r} workloads, not {scale.name!r}; use --cache")
    marker.write_text(scale.name + "\n")
    tars = root / "tars"
    tars.mkdir(exist_ok=True)
    scratch = root / "scratch-build"
    scratch.mkdir(exist_ok=True)
    return tars, scratch


def _tar_of(tars: Path, layer: Path, name: str) -> Path:
    return _cached(tars / f"{name}.tar", lambda t: dir_to_layer_tar(layer, t))


def build_rootfs(root: Path, scale: Scale, mirror: str | None = None) -> Stack:
    """Only the two-layer rootfs (a Debian one at full scale), for rows that need no other workload."""
    return _rootfs(root, scale, mirror, *_claim(root, scale))


def _rootfs(root: Path, scale: Scale, mirror: str | None, tars: Path, scratch: Path) -> Stack:
    rfs = root / "rootfs"
    rfs.mkdir(exist_ok=True)
    if scale.rootfs == "debootstrap":
        mir = mirror or debian_mirror()
        base = _cached(rfs / "base", lambda t: _debootstrap_base(t, mir))
        l2 = _cached(rfs / "layer2", lambda t: _chroot_layer(base, t))
    else:
        base = _cached(rfs / "base", lambda t: (t.mkdir(), _synthetic_base(t)))
        l2 = _cached(rfs / "layer2", lambda t: _synthetic_layer(base, t))
    log("rootfs layers ready; writing OCI tars and the flat copy")
    rootfs_tars = [_tar_of(tars, base, "rootfs-base"), _tar_of(tars, l2, "rootfs-layer2")]
    flat = _cached(rfs / "flat", lambda t: copy_merged([l2, base], t, scratch))
    return Stack("rootfs", [str(base), str(l2)], [str(p) for p in rootfs_tars], str(flat))


def build(root: Path, scale: Scale, mirror: str | None = None) -> Workset:
    """Build what is missing under root and describe it."""
    tars, scratch = _claim(root, scale)
    rootfs = _rootfs(root, scale, mirror, tars, scratch)

    def tar_of(layer: Path, name: str) -> Path:
        return _tar_of(tars, layer, name)

    stacks: dict[str, Stack] = {
        "rootfs": rootfs,
        "base": Stack("base", [rootfs.layers[0]], [rootfs.tars[0]], rootfs.layers[0]),
    }

    big = _cached(root / "big", lambda t: _big(t, scale.big_bytes))
    stacks["big"] = Stack("big", [str(big)], [str(tar_of(big, "big"))], str(big))

    chain_dir = root / "chain"
    chain_dir.mkdir(exist_ok=True)
    per = scale.chain_files // scale.chain_layers
    layers = [_cached(chain_dir / f"{i:02d}", lambda t, i=i: _chain_layer(t, i, per)) for i in range(scale.chain_layers)]
    log(f"{scale.chain_layers}-layer chain ready")
    chain_tars = [tar_of(p, f"chain-{p.name}") for p in layers]

    def chain_flat(t: Path) -> None:
        t.mkdir()
        for p in layers:
            run(["cp", "-a", f"{p}/.", str(t)], timeout=3600)

    cflat = _cached(root / "chain-flat", chain_flat)
    stacks["chain"] = Stack("chain", [str(p) for p in layers], [str(p) for p in chain_tars], str(cflat))

    dirs = _cached(root / "dir", lambda t: _dir_entries(t, scale.dir_entries))
    stacks["dir"] = Stack("dir", [str(dirs)], [str(tar_of(dirs, "dir"))], str(dirs))

    tree = _cached(root / "tree", lambda t: _tree(t, scale.tree_dirs, scale.tree_files_per_dir, scale.small_size))
    stacks["tree"] = Stack("tree", [str(tree)], [str(tar_of(tree, "tree"))], str(tree))

    # a cold walk of many small files (100k in 1,000 directories at full scale)
    many = _cached(root / f"many-{scale.many_dirs}x{scale.many_per_dir}",
                   lambda t: _tree(t, scale.many_dirs, scale.many_per_dir, 64))
    stacks["manyfiles"] = Stack("manyfiles", [str(many)], [str(tar_of(many, many.name))], str(many))

    empty = _cached(root / "empty", lambda t: t.mkdir())
    stacks["empty"] = Stack("empty", [str(empty)], [str(tar_of(empty, "empty"))], str(empty))

    rmtree(scratch)
    ws = Workset(
        root=str(root),
        scale=scale,
        stacks=stacks,
        big_file="big.bin",
        chain_bottom_files=[f"common/f000_{j:04d}" for j in range(per)],
        rootfs_tar=rootfs.tars[0],
    )
    (root / "manifest.json").write_text(json.dumps(asdict(ws), indent=1, default=str) + "\n")
    return ws


def describe(ws: Workset) -> dict[str, object]:
    """Counts shown in the report: how big each workload really is."""
    def count(p: str) -> tuple[int, int]:
        n = size = 0
        for dirpath, dirnames, filenames in os.walk(p):
            n += len(dirnames) + len(filenames)
            for f in filenames:
                try:
                    size += os.lstat(os.path.join(dirpath, f)).st_size
                except OSError:
                    pass
        return n, size

    rn, rs = count(ws.stacks["rootfs"].flat)
    wh = op = 0
    for rel, e in _scan(Path(ws.stacks["rootfs"].layers[1])):
        st = e.stat(follow_symlinks=False)
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            wh += 1
        elif e.is_dir(follow_symlinks=False) and is_opaque(e.path):
            op += 1
    return {
        "rootfs_entries": rn,
        "rootfs_bytes": rs,
        "rootfs_layer2_whiteouts": wh,
        "rootfs_layer2_opaque_dirs": op,
        "big_bytes": ws.scale.big_bytes,
        "chain_layers": ws.scale.chain_layers,
        "chain_files": ws.scale.chain_files,
        "dir_entries": ws.scale.dir_entries,
        "tree_files": ws.scale.tree_dirs * ws.scale.tree_files_per_dir,
        "create_files": ws.scale.create_files,
    }
