"""The store's directories and the file-level steps every store operation is built from.

Layout under the root (0700):

    metadata.db (+ -journal)   SQLite: layers, names, labels, references, intents (db.py);
                               the snapshotter's and other components' tables live there too
    layers/<hex>/              fs/, shadow/, tar-split.json.zst, entries.json.zst, layer.json
    staging/<rand>/            a layer being built (+ <rand>.lock, flocked while the import lives)
    trash/                     directories being deleted (renamed here first, so deletion is atomic)
    locks/<hex>.lock           per-chainID flock: import, remove and recovery of one layer serialize

Host modes never exceed what the layer presents: layer files and directories keep
the owner's bits the store needs (read/write, search) and only the group/other
read and execute bits the tar gave them (see host_file_mode / host_dir_mode).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
from pathlib import Path

from ..crashpoints import crash_point
from ..digest import hex_of
from ..linux import libc
from .locks import FileLock

log = logging.getLogger("fusesnap.store")

TAR_SPLIT = "tar-split.json.zst"
ENTRIES = "entries.json.zst"
LAYER_RECORD = "layer.json"
DB_FILE = "metadata.db"

SMALL_LAYER = 256  # members: below this, fsync each file instead of syncfs() of the whole fs


def host_file_mode(mode: int) -> int:
    """Host mode of a layer's regular file presented with `mode`: owner read/write (and
    execute if presented), group/other at most the read/execute bits presented."""
    return 0o600 | (mode & 0o155)


def host_dir_mode(mode: int) -> int:
    """Host mode of a layer directory presented with `mode` (the owner can always list it)."""
    return 0o700 | (mode & 0o055)


def no_sync() -> bool:
    return os.environ.get("FUSESNAP_NO_SYNC") == "1"


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding `path` once (cheaper than fsync per file)."""
    if no_sync():
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            libc.syncfs(fd)
        except OSError:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    if no_sync():
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: Path, members: int) -> None:
    """Make a staged layer durable: fsync each file and dir of a small layer, syncfs() a big one.

    syncfs waits for every dirty page of the filesystem (other processes' too), which
    is the cheap way for a big layer but slow for a snapshot commit of a few files.
    """
    if no_sync():
        return
    if members >= SMALL_LAYER:
        syncfs(path)
        return
    for dirpath, _dirnames, filenames in os.walk(path):
        for n in filenames:
            p = os.path.join(dirpath, n)
            try:
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue  # a symlink
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def rmtree(path: Path) -> None:
    """Remove a tree we created, also one holding 0o000 directories (a rootless daemon applies
    chmod for real): the owner takes access back everywhere, then removes. What cannot be
    removed stays (in trash/, for the next gc or cleanup)."""
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    try:
        shutil.rmtree(path)
        return
    except OSError:
        pass
    stack = [str(path)]
    while stack:
        d = stack.pop()
        try:
            os.chmod(d, stat.S_IRWXU)
            with os.scandir(d) as it:
                stack.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
        except OSError:
            continue
    shutil.rmtree(path, ignore_errors=True)


class StoreLayout:
    """Paths of one store root, and the steps that move directories between them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layers_dir = root / "layers"
        self.staging_dir = root / "staging"
        self.trash_dir = root / "trash"
        self.locks_dir = root / "locks"
        self.db_path = root / DB_FILE

    def create(self) -> None:
        """Make the directories (the root 0700); warn once when others can reach into the root."""
        fresh = not self.root.exists()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (self.layers_dir, self.staging_dir, self.trash_dir, self.locks_dir):
            d.mkdir(mode=0o700, exist_ok=True)
        if not fresh:
            st = os.stat(self.root)
            if st.st_mode & 0o011 and st.st_uid == os.geteuid():
                log.warning("store root %s is searchable by other users (mode %04o): layer files can be"
                            " read through it; `chmod 700 %s` closes it", self.root, stat.S_IMODE(st.st_mode),
                            self.root)

    def data_dirs(self) -> int:
        """How many layer and snapshot directories the root holds (data a database must describe)."""
        n = 0
        for d in (self.layers_dir, self.root / "snapshots"):
            try:
                with os.scandir(d) as it:
                    n += sum(1 for e in it if not e.name.startswith("."))
            except FileNotFoundError:
                pass
        return n

    def layer_dir(self, chain_id: str) -> Path:
        return self.layers_dir / hex_of(chain_id)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def chain_lock(self, chain_id: str, blocking: bool = True) -> FileLock:
        return FileLock(self.locks_dir / f"{hex_of(chain_id)}.lock", blocking)

    def new_staging(self) -> tuple[Path, FileLock]:
        """A fresh staging directory and the lock that marks it live (released on process death)."""
        name = secrets.token_hex(8)
        lock = FileLock(self.staging_dir / f"{name}.lock")
        stage = self.staging_dir / name
        try:
            stage.mkdir(mode=0o700)
        except BaseException:
            lock.path.unlink(missing_ok=True)
            lock.close()
            raise
        return stage, lock

    def trash(self, path: Path) -> None:
        """Delete a directory: rename it into trash/ (atomic), then remove it there."""
        if not (path.exists() or path.is_symlink()):
            return
        t = self.trash_dir / f"{path.name}-{secrets.token_hex(4)}"
        try:
            os.rename(path, t)
        except FileNotFoundError:
            return  # someone else (a concurrent recovery) took it
        crash_point("in-trash")
        rmtree(t)
