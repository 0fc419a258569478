"""The merged lower tree of a chain, computed once and cached per chainID.

A chain's layers never change, so its merged tree never does either. The
cache lives in `cache/lowertrees/<chainID hex>` (PackedTree.save format: flat
arrays, so a daemon holds a million-entry chain in ~70 MB); a chain missing
from it is built from the nearest cached ancestor plus the layers above it (one
pass over each layer's index), so mounting chain N after chain N-1 reads one
index, and mounting a chain again reads none.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from ..digest import hex_of, is_digest
from ..errors import FusesnapError
from ..fs.core.lower import IndexLower
from ..fs.core.lowertree import LowerTree
from ..fs.core.packedtree import PackedTree, TreeBuilder
from .landmarks import without_landmarks

if TYPE_CHECKING:
    from ..store.layerstore import LayerStore

log = logging.getLogger(__name__)

_MEMORY_SLOTS = 8


class TreeCache:
    def __init__(self, directory: Path, store: "LayerStore") -> None:
        self.dir = Path(directory)
        self.store = store
        self._mem: OrderedDict[str, LowerTree | PackedTree] = OrderedDict()
        self.built_layers = 0  # layers read from indexes by this instance (observability for tests/bench)

    @classmethod
    def for_store(cls, store: "LayerStore") -> "TreeCache":
        """The cache every user of a store shares (cache/lowertrees in its root)."""
        return cls(store.root / "cache" / "lowertrees", store)

    def path(self, chain_id: str) -> Path:
        return self.dir / hex_of(chain_id)

    def _remember(self, chain_id: str, tree: LowerTree | PackedTree) -> None:
        self._mem[chain_id] = tree
        self._mem.move_to_end(chain_id)
        while len(self._mem) > _MEMORY_SLOTS:
            self._mem.popitem(last=False)

    def _load(self, chain_id: str) -> LowerTree | PackedTree | None:
        if chain_id in self._mem:
            self._mem.move_to_end(chain_id)
            return self._mem[chain_id]
        p = self.path(chain_id)
        if not p.exists():
            return None
        try:
            tree = LowerTree.load(p)
        except (FusesnapError, OSError, ValueError) as e:
            log.warning("discarding lower tree cache of %s: %s", chain_id, e)
            p.unlink(missing_ok=True)
            return None
        self._remember(chain_id, tree)
        return tree

    def _lower(self, chain_id: str) -> IndexLower:
        self.built_layers += 1
        return IndexLower(without_landmarks(self.store.entries(chain_id)), self.store.fs_dir(chain_id))

    def get(self, chain_id: str | None) -> LowerTree | PackedTree:
        """The merged tree of chain `chain_id` (None: the empty tree)."""
        if not chain_id:
            return TreeBuilder().pack()
        tree = self._load(chain_id)
        if tree is not None:
            return tree
        chain = self.store.chain(chain_id)
        builder: TreeBuilder | None = None
        start = 0
        for i in range(len(chain) - 2, -1, -1):
            base = self._load(chain[i])
            if isinstance(base, PackedTree):  # (an older cache format is rebuilt, not extended)
                builder = TreeBuilder.from_packed(base)
                start = i + 1
                break
        if builder is None:
            builder = TreeBuilder()
        for c in chain[start:]:
            builder.apply(self._lower(c))
        tree = builder.pack()
        self.save(chain_id, tree)
        return tree

    def save(self, chain_id: str, tree: LowerTree | PackedTree) -> None:
        self._remember(chain_id, tree)
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            tree.save(self.path(chain_id))
        except OSError as e:  # a read-only or full cache dir costs speed, not correctness
            log.warning("cannot cache the lower tree of %s: %s", chain_id, e)

    def cached(self, chain_id: str) -> bool:
        return chain_id in self._mem or self.path(chain_id).exists()

    def prune(self, live: set[str]) -> list[str]:
        """Delete cached trees of chains that no longer exist; return what was removed."""
        removed: list[str] = []
        if not self.dir.exists():
            return removed
        live_hex = {hex_of(c) for c in live if is_digest(c)}
        for p in sorted(self.dir.iterdir()):
            if p.name not in live_hex:
                p.unlink(missing_ok=True)
                removed.append(str(p))
        for c in [c for c in self._mem if c not in live]:
            del self._mem[c]
        return removed
