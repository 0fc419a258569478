"""Optional py-spy profiles of fusesnap's daemons: where its time goes per workload.

With --profile DIR, after the timed runs of a workload, one extra (unrecorded) run
per fusesnap target is sampled by `py-spy record --native --format raw` (collapsed stacks,
C frames included: time in epoll_wait is the daemon waiting for the next request). summarize() turns a raw
file into the top functions by own and by inclusive samples.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def find_pyspy() -> str | None:
    p = Path(sys.executable).parent / "py-spy"
    return str(p) if p.exists() else shutil.which("py-spy")


class Recorder:
    """py-spy attached to one pid for the duration of a with-block."""

    def __init__(self, pyspy: str, pid: int, out: Path, rate: int = 250) -> None:
        # --native: C frames too (libfuse's writev of replies, epoll_wait between requests,
        # pread in read handlers): a Python-only profile hides where a FUSE daemon waits.
        self.cmd = [pyspy, "record", "--pid", str(pid), "--format", "raw", "--nolineno", "--native",
                    "--rate", str(rate), "--output", str(out)]
        self.out = out
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Recorder":
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)  # let it attach before the step starts
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            err = ""
        if not self.out.exists():
            print(f"bench: py-spy wrote no profile: {(err or '').strip()[-200:]}", file=sys.stderr)


def category(leaf: str) -> str:
    """Coarse bucket of a leaf frame: where a FUSE daemon's time goes."""
    if leaf.startswith(("epoll_wait ", "poll ", "select ")):
        return "waiting for the next request (epoll/poll)"
    if leaf.startswith(("writev ", "fuse_reply")):
        return "replying to the kernel (writev to /dev/fuse)"
    if "(libc.so" in leaf or "[vdso]" in leaf:
        return "host syscalls (open, stat, read, pread, ...)"
    if "fusesnap/" in leaf:
        return "fusesnap Python code"
    return "pyfuse3, trio and CPython overhead"


def summarize(raw: Path, top: int = 12) -> str:
    """Samples by category, then the top functions by own samples and the fusesnap
    functions by inclusive samples, as markdown lists."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    cats: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f.strip() for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        cats[category(frames[-1])] += n
        for f in set(frames):
            if "fusesnap/" in f:
                incl[f] += n
    if not total:
        return "(no samples: the daemon was idle or py-spy could not attach)\n"
    lines = [f"{total} samples. By category:"]
    lines += [f"- {100 * c / total:5.1f}%  {f}" for f, c in cats.most_common()]
    lines.append("Own time:")
    lines += [f"- {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    lines.append("Inclusive time of fusesnap functions:")
    # frames on every sample (main, the serve loop) say nothing; leave them out
    lines += [f"- {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common() if c < total][:top]
    return "\n".join(lines) + "\n"
