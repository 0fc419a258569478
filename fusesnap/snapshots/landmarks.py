"""eStargz's prefetch landmarks: marker members at a layer's root, not files of the image.

`fusesnap optimize` ends each layer's recorded files with `.prefetch.landmark`
(a layer without any starts with `.no.prefetch.landmark`), as eStargz does, so
a lazy puller knows how much of the layer to fetch first. Readers that know
the convention hide them (stargz-snapshotter's filesystem, containers/storage);
fusesnap's store mounts do too, so an optimized image's merged tree is the
original's.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from ..layerentry import LayerEntry

PREFETCH = b".prefetch.landmark"
NO_PREFETCH = b".no.prefetch.landmark"
NAMES = frozenset({PREFETCH, NO_PREFETCH})
CONTENT = b"\x0f"     # what eStargz writes into either one


def without_landmarks(entries: Iterable[LayerEntry]) -> Iterator[LayerEntry]:
    """A layer's entries minus the landmarks at its root."""
    for e in entries:
        if e.path not in NAMES:
            yield e
