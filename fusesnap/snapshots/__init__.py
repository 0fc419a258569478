"""containerd-style snapshotter over the layer store, mounted through the FUSE filesystem."""
