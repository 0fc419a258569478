"""Extended attributes of the view: the lowers' as the layer recorded them, the upper's
from the host, the filesystem's own bookkeeping (opaque markers, override_stat)
never shown and never settable."""

from __future__ import annotations

import errno
import os

from fusesnap.fs.core import upperformat
from fusesnap.fs.core.copyup import CopyUp
from fusesnap.fs.core.errs import err
from fusesnap.fs.core.inodes import Inode
from fusesnap.fs.core.upperdir import UpperDir


class Xattrs:
    __slots__ = ("upper", "copyup")

    def __init__(self, upper: UpperDir, copyup: CopyUp) -> None:
        self.upper = upper
        self.copyup = copyup

    def get(self, i: Inode, name: bytes) -> bytes:
        if upperformat.is_hidden_xattr(name):
            raise err(errno.ENODATA)
        if not i.upper:
            x = i.lower.xattrs
            v = x.get(name) if x else None
            if v is None:
                raise err(errno.ENODATA)
            return v
        t = self.upper.target(i)
        if isinstance(t, int):
            return os.getxattr(t, name)
        return os.getxattr(t, name, follow_symlinks=False)

    def list(self, i: Inode) -> list[bytes]:
        if not i.upper:
            x = i.lower.xattrs
            return list(x.keys()) if x else []
        t = self.upper.target(i)
        names = os.listxattr(t) if isinstance(t, int) else os.listxattr(t, follow_symlinks=False)
        return [n for n in (os.fsencode(n) for n in names) if not upperformat.is_hidden_xattr(n)]

    def set(self, i: Inode, name: bytes, value: bytes) -> None:
        self.upper.writable()
        if upperformat.is_hidden_xattr(name):
            raise err(errno.EPERM)
        self.copyup.copy_up(i)
        t = self.upper.target(i)
        if isinstance(t, int):
            os.setxattr(t, name, value)
        else:
            os.setxattr(t, name, value, follow_symlinks=False)
        i.attr = None

    def remove(self, i: Inode, name: bytes) -> None:
        self.upper.writable()
        if upperformat.is_hidden_xattr(name):
            raise err(errno.ENODATA)
        if not i.upper:
            x = i.lower.xattrs
            if not x or name not in x:
                raise err(errno.ENODATA)
        self.copyup.copy_up(i)
        t = self.upper.target(i)
        if isinstance(t, int):
            os.removexattr(t, name)
        else:
            os.removexattr(t, name, follow_symlinks=False)
