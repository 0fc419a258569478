"""Committed snapshot names -> chainIDs, for commands outside the snapshotter (e.g. `fusesnap export NAME`).

Reads the store database read-only (never creates it). Every committed name is
also one of its layer's store names, so the store resolves them itself; this
answers for stores whose names predate that.
"""

from __future__ import annotations

from pathlib import Path

from .metadata import committed_chain


def chain_of_name(root: Path | str, name: str) -> str | None:
    """The chainID committed snapshot `name` stands for, or None."""
    return committed_chain(root, name)
