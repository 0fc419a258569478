"""Mount options: the fuse-overlayfs `-o` vocabulary, parsed into MountOptions."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from fusesnap.errors import InvalidInput


@dataclass
class IdMap:
    """uidmapping=/gidmapping=: `on-disk:presented:len[:...]` ranges (fuse-overlayfs syntax)."""

    ranges: list[tuple[int, int, int]] = field(default_factory=list)   # (host, presented, len)

    def to_presented(self, host: int) -> int:
        for h, p, n in self.ranges:
            if h <= host < h + n:
                return p + host - h
        return 65534 if self.ranges else host

    def to_host(self, presented: int) -> int:
        for h, p, n in self.ranges:
            if p <= presented < p + n:
                return h + presented - p
        return presented

    def __bool__(self) -> bool:
        return bool(self.ranges)

    @classmethod
    def parse(cls, text: str, what: str) -> "IdMap":
        parts = [p for p in text.replace(",", ":").split(":") if p != ""]
        if len(parts) % 3:
            raise InvalidInput(f"invalid {what} {text!r}: expected on-disk:presented:len triples")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise InvalidInput(f"invalid {what} {text!r}: not a number") from None
        return cls([(nums[i], nums[i + 1], nums[i + 2]) for i in range(0, len(nums), 3)])


@dataclass
class MountOptions:
    lowerdirs: list[str] = field(default_factory=list)
    upperdir: str | None = None
    workdir: str | None = None
    timeout: float = 3600.0
    read_only: bool = False
    allow_other: bool | None = None          # None: on for root of a user namespace (fs/fuse/mount.py)
    default_permissions: bool | None = None  # None: on when root (as fuse-overlayfs, off rootless)
    uidmap: IdMap = field(default_factory=IdMap)
    gidmap: IdMap = field(default_factory=IdMap)
    squash_uid: int | None = None
    squash_gid: int | None = None
    xattr_permissions: int = 0
    static_nlink: bool = False
    noxattrs: bool = False
    volatile: bool = False
    fsync: bool = True
    writeback: bool = False                 # writeback=1: the kernel's writeback cache (off: see docs/BENCHMARKS.md)
    debug: bool = False
    fuse_options: list[str] = field(default_factory=list)   # passed through to libfuse (dev, suid, ...)
    fsname: str = "fusesnap-overlay"
    keep_atime: bool = False                 # relatime/strictatime given: do not add noatime
    read_ahead_kb: int | None = None         # read_ahead_kb=N: the mount's read-ahead (root only); None: default
    readdirplus_auto: bool = False           # readdirplus=auto: plain READDIR for listings nobody stats (off: see ARCHITECTURE)
    busy_poll_us: int | None = None          # busy_poll=N: spin N us for the next request (0: never); None: auto (fs/fastloop.py)
    record: str | None = None                # record=FILE: log the files a workload touches (fs/core/recording.py)
    # the lower layers for that log, bottom first: (directory holding the layer's data, chainID or None);
    # empty: the lowerdirs
    record_layers: list[tuple[str, str | None]] = field(default_factory=list)

    def layers_for_record(self) -> list[tuple[str, str | None]]:
        return self.record_layers or [(d, None) for d in reversed(self.lowerdirs)]


_PASSTHROUGH = {"dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
                "diratime", "nodiratime", "sync", "async", "dirsync"}
_IGNORED = {"rw", "redirect_dir", "index", "metacopy", "xino", "userxattr", "context",
            "fsync", "threaded", "fast_ino", "plugins", "noacl", "lazytime", "nfs_export",
            "uuid"}


def _split_escaped(text: str, sep: str, escapes_any: bool) -> list[str]:
    """Split on sep; a backslash escapes the next character (any, or only sep)."""
    out, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and (escapes_any or text[i + 1] == sep):
            cur.append(text[i + 1])
            i += 2
            continue
        if c == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def split_lowerdir(value: str) -> list[str]:
    """Split lowerdir= on ':' honouring '\\:' escapes; empty items are dropped."""
    return [p for p in _split_escaped(value, ":", True) if p]


def split_options(text: str) -> list[str]:
    """Split an -o string on commas; a comma inside a lowerdir escaped as '\\,' is kept."""
    return [o for o in _split_escaped(text, ",", False) if o.strip()]


def parse_options(opt_strings: list[str], opts: MountOptions | None = None,
                  warn=lambda m: print(f"fusesnap-overlay: {m}", file=sys.stderr)) -> MountOptions:
    """Apply every `-o` string in order. Relative paths resolve against the cwd now."""
    o = opts or MountOptions()
    for text in opt_strings:
        for item in split_options(text):
            key, eq, val = item.partition("=")
            key = key.strip()
            if key == "lowerdir":
                o.lowerdirs = [os.path.abspath(p) for p in split_lowerdir(val)]
            elif key == "upperdir":
                o.upperdir = os.path.abspath(val) if val else None
            elif key == "workdir":
                o.workdir = os.path.abspath(val) if val else None
            elif key == "timeout":
                try:
                    o.timeout = float(val)
                except ValueError:
                    raise InvalidInput(f"invalid timeout={val!r}: not a number") from None
                if o.timeout < 0:
                    raise InvalidInput(f"invalid timeout={val!r}: negative")
            elif key == "ro":
                o.read_only = True
            elif key == "allow_other":
                o.allow_other = True
            elif key == "default_permissions":
                o.default_permissions = True
            elif key == "uidmapping":
                o.uidmap = IdMap.parse(val, "uidmapping")
            elif key == "gidmapping":
                o.gidmap = IdMap.parse(val, "gidmapping")
            elif key == "squash_to_root":
                o.squash_uid, o.squash_gid = 0, 0
            elif key == "squash_to_uid":
                o.squash_uid = _int(key, val)
            elif key == "squash_to_gid":
                o.squash_gid = _int(key, val)
            elif key == "xattr_permissions":
                n = _int(key, val)
                if n not in (0, 1, 2):
                    raise InvalidInput(f"invalid xattr_permissions={val!r}: expected 0, 1 or 2")
                o.xattr_permissions = n
            elif key == "static_nlink":
                o.static_nlink = True
            elif key == "noxattrs":
                o.noxattrs = val != "0"
            elif key == "volatile":
                o.volatile = True
                o.fsync = False
            elif key == "fsync":
                o.fsync = val != "0"
            elif key == "writeback":
                o.writeback = val != "0"
            elif key == "debug":
                o.debug = True
            elif key == "fsname":
                o.fsname = val or o.fsname
            elif key == "read_ahead_kb":
                o.read_ahead_kb = _int(key, val)
                if o.read_ahead_kb < 0:
                    raise InvalidInput(f"invalid read_ahead_kb={val!r}: negative")
            elif key == "record":
                if not val:
                    raise InvalidInput("invalid record=: a file name is needed")
                o.record = os.path.abspath(val)
            elif key == "readdirplus":
                if val not in ("auto", "always"):
                    raise InvalidInput(f"invalid readdirplus={val!r}: expected auto or always")
                o.readdirplus_auto = val == "auto"
            elif key == "busy_poll":
                o.busy_poll_us = _int(key, val)
                if o.busy_poll_us < 0:
                    raise InvalidInput(f"invalid busy_poll={val!r}: negative")
            elif key in ("relatime", "strictatime"):
                o.keep_atime = True          # the kernel's default; libfuse has no such option
            elif key in _PASSTHROUGH:
                if key not in o.fuse_options:
                    o.fuse_options.append(key)
            elif key in _IGNORED:
                pass
            else:
                warn(f"warning: ignoring unknown option {item!r}")
    return o


def _int(key: str, val: str) -> int:
    try:
        return int(val)
    except ValueError:
        raise InvalidInput(f"invalid {key}={val!r}: not an integer") from None
