"""Where things live by default (XDG base directories)."""

from __future__ import annotations

import os
from pathlib import Path


def default_root() -> Path:
    """Store root: $FUSESNAP_ROOT, else $XDG_DATA_HOME/fusesnap, else ~/.local/share/fusesnap."""
    env = os.environ.get("FUSESNAP_ROOT")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "fusesnap"
