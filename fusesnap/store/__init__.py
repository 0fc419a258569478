"""The layer store: content-addressed layers keyed by chainID, byte-exact tar import/export."""

from .layerstore import FsckReport, LayerInfo, LayerStore

__all__ = ["FsckReport", "LayerInfo", "LayerStore"]
