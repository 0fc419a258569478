"""The union filesystem (pyfuse3 + trio): lowers merged once, a writable upper, kernel caches.

Public API (see docs/ARCHITECTURE.md, "Filesystem API"):

- lower.py       LowerSource protocol, DirLower (host directory), IndexLower (store layer)
- lowertree.py   LNode, LowerTree (save/load/overlay/lookup/link_paths), build_lower_tree,
                 lower_tree_from_dirs
- lazytree.py    LazyLowerTree: the same interface over host directories, merged per
                 directory on first use (O(1) mount for the fuse-overlayfs front end)
- mount.py       mount(tree, upper, work, mountpoint, opts, foreground) -> exit code
- options.py     MountOptions, parse_options (fuse-overlayfs `-o` vocabulary), IdMap
- upperformat.py whiteout_target, is_opaque, presented_stat, visible_xattrs,
                 parse_override/format_override/read_override

Internals: union.py (all merge/copy-up/whiteout logic, plain Python, unit-testable),
inodes.py (runtime Inode), copyup.py, longpath.py (paths beyond PATH_MAX),
operations.py (thin pyfuse3 glue), fastloop.py (cheaper wait for the next
request, busy polling), splicing.py (how big a spliced READ reply may be),
readahead.py (the mount's read-ahead), overlay_cli.py (`fusesnap-overlay`).
"""
