"""Test hook: FUSESNAP_CRASH_AT=<name> kills the process with SIGKILL at the point of that name.

The kill-at-a-chosen-point tests use it to show that an interrupted command
leaves the store consistent. Stdlib only, so that any module can name a point.
"""

from __future__ import annotations

import os


def crash_point(name: str) -> None:
    if os.environ.get("FUSESNAP_CRASH_AT") == name:
        os.kill(os.getpid(), 9)
