"""layers/<hex>/layer.json: what the database knows about a layer, kept beside its files.

Written into the staging directory before the layer is put in place, so every
complete layer directory carries its own row: a lost or damaged database is
rebuilt from these (fsck --repair), never answered by deleting layers.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import IntegrityError
from .layout import LAYER_RECORD


@dataclass
class LayerRecord:
    chain_id: str
    diff_id: str
    parent: str | None
    diff_size: int
    tar_size: int
    created: str
    compressed: list[tuple[str, int]] = field(default_factory=list)  # (digest, size) it was imported from
    labels: dict[str, str] = field(default_factory=dict)  # given at import
    names: list[str] = field(default_factory=list)  # given at import
    note: dict = field(default_factory=dict)  # what the importer asked to keep (the snapshotter: its record)

    def write(self, layer_dir: Path) -> None:
        data = json.dumps(asdict(self), sort_keys=True).encode()
        fd = os.open(layer_dir / LAYER_RECORD, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    @classmethod
    def read(cls, layer_dir: Path) -> "LayerRecord | None":
        """The record of a layer directory; None when it has none (written by an older fusesnap)."""
        try:
            raw = (layer_dir / LAYER_RECORD).read_bytes()
        except FileNotFoundError:
            return None
        try:
            d = json.loads(raw)
            rec = cls(**d)
            rec.compressed = [(str(a), int(b)) for a, b in rec.compressed]
        except (ValueError, TypeError) as e:
            raise IntegrityError(f"{layer_dir / LAYER_RECORD} is damaged: {e}") from None
        return rec
