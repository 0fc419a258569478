"""Which layer of a chain serves a path, and the Recorder API built on it.

`ChainView` answers over the chain's merged lower tree (the one its mounts
serve, cached per chainID): a path is followed through symlinks as the kernel
would inside the image, and the layer that serves the file is the one whose
directory holds its content (the same rule a recorded mount logs by). When a
path is not in the merged tree, the layers' indexes say why: a whiteout in a
higher layer deleted it, a higher layer made a directory above it opaque, or
no layer has it.

`Recorder(store, chain, out).record(path)` is stargz-snapshotter's image
recorder over that view: it returns the serving layer's index, refuses a
deleted, hidden or missing file, and `close()` writes the record.
"""

from __future__ import annotations

import os
import stat as S
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ..errors import InvalidInput, NotFound
from ..fs.core import upperformat
from ..fs.core.lowertree import LNode
from .accessrecord import RecordEntry, dump
from .landmarks import without_landmarks
from .treecache import TreeCache

if TYPE_CHECKING:
    from ..store.layerstore import LayerStore

MAX_SYMLINKS = 40   # as the kernel's path walk (ELOOP)


class RecordError(NotFound):
    """A path the recorder cannot attribute to a layer."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path


class DeletedFile(RecordError):
    """A higher layer's whiteout deleted the file (or a directory above it)."""


class HiddenByOpaque(RecordError):
    """The file is inside a directory a higher layer made opaque."""


class NotInAnyLayer(RecordError):
    """No layer of the chain has the file."""


class NotAFile(RecordError):
    """The path names a directory, a device or a fifo: nothing to read ahead."""


@dataclass(frozen=True)
class Served:
    path: str           # the merged path, symlinks followed
    layer_index: int    # position in the chain, bottom 0
    chain_id: str
    size: int
    src: bytes          # host file holding the content


@dataclass
class _LayerIndex:
    """What one layer says about names, for explaining a path the merged tree lacks."""

    names: set[bytes]
    whiteouts: set[bytes]
    opaque: set[bytes]


def _components(path: bytes) -> list[bytes]:
    return [p for p in path.split(b"/") if p and p != b"."]


def _ancestors(path: bytes) -> list[bytes]:
    """b"a/b/c" -> [b"", b"a", b"a/b"]: the directories above a path, root first."""
    parts = path.split(b"/")
    return [b"/".join(parts[:k]) for k in range(len(parts))]


class ChainView:
    """The merged tree of a chain of store layers, and which layer serves each file."""

    def __init__(self, store: "LayerStore", top: str | None, trees: TreeCache | None = None) -> None:
        self.store = store
        self.chain: list[str] = store.chain(store.get(top).chain_id) if top else []
        self.tree = (trees or TreeCache.for_store(store)).get(self.chain[-1] if self.chain else None)
        roots = [(os.fsencode(store.fs_dir(c)) + b"/", i, c) for i, c in enumerate(self.chain)]
        self._roots = sorted(roots, key=lambda r: len(r[0]), reverse=True)   # a root may prefix another
        self._indexes: dict[int, _LayerIndex] = {}

    def layer_of(self, src: bytes) -> tuple[int, str]:
        for root, i, chain in self._roots:
            if src.startswith(root):
                return i, chain
        raise InvalidInput(f"the cached lower tree of {self.chain[-1]} names a file outside its layers: "
                           f"{os.fsdecode(src)} (was the store moved?)")

    def resolve(self, path: str | bytes) -> Served:
        """The file `path` names in the merged tree, and the layer that serves it."""
        shown = os.fsdecode(path)
        real, node = self._walk(os.fsencode(path), shown)
        if node.kids is not None:
            raise NotAFile(shown, "is a directory, not a file")
        if not S.S_ISREG(node.mode) or node.src is None:
            raise NotAFile(shown, "is not a regular file")
        idx, chain = self.layer_of(node.src)
        return Served(os.fsdecode(real), idx, chain, node.size, node.src)

    def _walk(self, path: bytes, shown: str) -> tuple[bytes, LNode]:
        root = self.tree.root
        todo = _components(path)
        todo.reverse()                  # a stack: next component last
        if not todo:
            raise NotAFile(shown, "is the root directory, not a file")
        cur: list[bytes] = []
        node = root
        hops = 0
        while todo:
            name = todo.pop()
            if name == b"..":
                if cur:
                    cur.pop()
                node = self.tree.lookup(b"/".join(cur)) or root
                continue
            if node.kids is None:
                raise NotInAnyLayer(shown, f"{os.fsdecode(b'/'.join(cur))} is not a directory")
            kid = node.kids.get(name)
            if kid is None:
                raise self._missing(b"/".join(cur + [name]), shown, bool(todo))
            if S.S_ISLNK(kid.mode):
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise NotInAnyLayer(shown, "too many levels of symbolic links")
                target = kid.target or b""
                if target.startswith(b"/"):
                    cur, node = [], root
                todo.extend(reversed(_components(target)))
                continue
            cur.append(name)
            node = kid
        return b"/".join(cur), node

    # -- why a path is missing ---------------------------------------------------------
    def _index(self, i: int) -> _LayerIndex:
        ix = self._indexes.get(i)
        if ix is None:
            names: set[bytes] = set()
            whiteouts: set[bytes] = set()
            opaque: set[bytes] = set()
            for e in without_landmarks(self.store.entries(self.chain[i])):
                path = e.path.strip(b"/")
                parent, _, name = path.rpartition(b"/")
                if name == upperformat.OPQ_NAME:
                    opaque.add(parent)
                    continue
                hidden = upperformat.whiteout_target(name, S.S_IFCHR if e.kind == "chr" else None,
                                                     os.makedev(e.devmajor, e.devminor))
                if hidden is not None:
                    whiteouts.add(parent + b"/" + hidden if parent else hidden)
                    continue
                names.add(path)
                if e.kind == "dir" and upperformat.xattrs_say_opaque(e.xattrs):
                    opaque.add(b"" if path == b"." else path)
            ix = self._indexes[i] = _LayerIndex(names, whiteouts, opaque)
        return ix

    def _below(self, i: int, path: bytes) -> bool:
        return any(path in self._index(j).names for j in range(i))

    def _missing(self, path: bytes, shown: str, directory: bool) -> RecordError:
        """Why the merged tree has nothing at `path`, the first missing component of a walk
        (`directory`: one above the file asked for)."""
        above = _ancestors(path)
        what = f"its directory {os.fsdecode(path)}" if directory else "it"
        for i in range(len(self.chain) - 1, -1, -1):
            ix = self._index(i)
            if path in ix.names:        # a higher layer replaced a directory above it
                return NotInAnyLayer(shown, f"{what} is hidden by a layer above layer {i}")
            gone = next((a for a in above[1:] + [path] if a in ix.whiteouts), None)
            if gone is not None and self._below(i, path):
                if gone != path:
                    what += f" (with its directory {os.fsdecode(gone)})"
                return DeletedFile(shown, f"{what} was deleted by a whiteout in layer {i}")
            opq = next((a for a in above if a in ix.opaque), None)
            if opq is not None and self._below(i, path):
                return HiddenByOpaque(shown, f"{what} is inside {os.fsdecode(opq) or '/'}, which layer {i} made "
                                      "opaque")
        return NotInAnyLayer(shown, f"{what} is in no layer of "
                             f"{self.chain[-1] if self.chain else 'the empty chain'}")


def record_layers(store: "LayerStore", top: str | None) -> list[tuple[str, str | None]]:
    """What a recorded store mount logs layers by: (data directory, chainID), bottom first."""
    return [(str(store.fs_dir(c)), c) for c in (store.chain(top) if top else [])]


class Recorder:
    """Records files of a chain by path, each once, in the order given; close() writes them."""

    def __init__(self, store: "LayerStore", chain: str | Sequence[str], out: str | os.PathLike,
                 trees: TreeCache | None = None) -> None:
        """chain: the top layer (chainID, hex prefix or name) or the chain's chainIDs bottom first."""
        if isinstance(chain, str):
            top = chain
        else:
            chain = list(chain)
            if not chain:
                raise InvalidInput("an empty chain has no files to record")
            top = chain[-1]
            if store.chain(store.get(top).chain_id) != chain:
                raise InvalidInput(f"the layers given are not the chain of {top}")
        self.view = ChainView(store, top, trees)
        self.out = out
        self.entries: list[RecordEntry] = []
        self._seen: dict[str, int] = {}
        self._closed = False

    def record(self, path: str | bytes) -> int:
        """The index of the layer serving `path`; RecordError for a deleted, hidden, missing or
        non-regular file."""
        if self._closed:
            raise InvalidInput("the recorder is closed")
        s = self.view.resolve(path)
        if s.path not in self._seen:
            self._seen[s.path] = s.layer_index
            self.entries.append(RecordEntry(s.path, s.layer_index, s.chain_id, s.size))
        return s.layer_index

    def close(self) -> None:
        """Write the record (once)."""
        if not self._closed:
            self._closed = True
            dump(self.out, self.entries)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
