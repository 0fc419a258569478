"""Free page reporting off for a run: re-touching freed memory must not be random.

On a VM with virtio-balloon free page reporting (this one: `reported_kib` over
10^9), memory the guest frees -- `drop_caches` before every cold step frees
gigabytes -- is handed back to the host in 2 MiB blocks, and the next touch of
it faults on the host. A cold 2 GiB `dd` on the plain directory then took
either ~1.0 s or 1.8-3.3 s, the slow runs with 1-3 s of system time in the copy
out of the page cache; a FUSE target, which caches every byte twice (the lower
file and the mount), was hit harder, and which target drew the slow runs
decided the medians of the cold read and copy-up rows. With reporting off the
same `dd` took 0.95-1.04 s six times in a row. The order above which freed
blocks are reported is a module parameter: the run raises it past the largest
order (nothing is reported) and puts it back afterwards.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from benchlib.runner import log

PARAM = Path("/sys/module/page_reporting/parameters/page_reporting_order")
NEVER = 11          # above MAX_PAGE_ORDER (10): no free block is that big


@contextlib.contextmanager
def no_free_page_reporting(param: Path = PARAM) -> Iterator[str]:
    """Yields what was done, for the report."""
    try:
        before = param.read_text().strip()
        param.write_text(f"{NEVER}\n")
    except OSError:
        yield "not changed (no free page reporting here, or not root)"
        return
    log(f"free page reporting off for the run (page_reporting_order {before} -> {NEVER})")
    try:
        yield f"off for the run (page_reporting_order {before} -> {NEVER}, restored after)"
    finally:
        try:
            param.write_text(f"{before}\n")
        except OSError as e:
            log(f"could not restore page_reporting_order {before}: {e}")
