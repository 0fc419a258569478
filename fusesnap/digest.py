"""Digest helpers shared by the store and the snapshotter (containerd/moby conventions)."""

from __future__ import annotations

import hashlib
import re

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def is_digest(s: str) -> bool:
    return bool(_DIGEST_RE.match(s))


def chain_id(parent_chain_id: str | None, diff_id: str) -> str:
    """chainID(parent + layer) as containerd's identity.ChainID computes it."""
    if not parent_chain_id:
        return diff_id
    h = hashlib.sha256(f"{parent_chain_id} {diff_id}".encode()).hexdigest()
    return "sha256:" + h


def chain_ids(diff_ids: list[str]) -> list[str]:
    out: list[str] = []
    parent: str | None = None
    for d in diff_ids:
        parent = chain_id(parent, d)
        out.append(parent)
    return out


def hex_of(digest: str) -> str:
    """The hex part of 'sha256:<hex>' (used for directory names)."""
    algo, _, hx = digest.partition(":")
    if algo != "sha256" or not hx:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hx
