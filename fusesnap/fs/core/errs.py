"""OSError with only an errno: how every core rule reports what the caller should see."""

from __future__ import annotations

import os


def err(code: int) -> OSError:
    return OSError(code, os.strerror(code))
