"""fusesnap: a rootless container layer store and FUSE union filesystem."""

__version__ = "0.1.0"
