"""The benchmark's podman rows: rootless podman (as the unprivileged user the tests use)
with each FUSE mount program as its overlay driver's mount_program, side by side.

- `podman run --rm IMG true`: one container start and stop, i.e. one mount, the
  runtime, one unmount; what a CI runner or a build server pays per container.
- `podman build` of a multi-step Containerfile (8 RUN steps: copies, deletes of lower
  trees, many small files, a walk, an untar, links, a rename): every step mounts the
  container and, to commit it, compares its tree with its parent's through two more
  mounts.

The image is the workset's two-layer rootfs plus a layer holding busybox-static under
/.bench/bin (so that the same steps run on the tiny synthetic rootfs), loaded once per
target into a podman set-up of its own (benchlib/podmanenv.py) under the run's scratch
directory; a first untimed `podman run` checks that the container's root is the
target's mount and warms both up the same way.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
import time
from pathlib import Path

from .ociarchive import Entry, busybox_entries, layer_tar, write_oci_archive
from .podmanenv import PodmanEnv, PodmanError, missing_tools
from .runner import log
from .sysutil import BenchError, is_root, rmtree
from .targets import FuseProgram, Target
from .workloads import Ctx, Workload

PODMAN_USER = "fusesnap-test"
IMAGE = "localhost/bench-rootfs:1"
BUILT = "localhost/bench-built:1"
TOOLS = "/.bench/bin"
APPLETS = ["sh", "cat", "chmod", "cp", "echo", "find", "ln", "mkdir", "mv", "rm", "tar", "true", "wc"]
FSTYPES = {"fuse-overlayfs": "fuse.fuse-overlayfs", "fusesnap-overlay": "fuse.fusesnap"}

STEPS = [
    "echo one > /one && mkdir -p /app",
    "cp -a /etc /app/etc && cp -a /var/lib/dpkg /app/dpkg",
    "rm -rf /usr/share/doc /usr/share/man && mkdir /usr/share/doc",
    "i=0; while [ $i -lt 1000 ]; do echo $i > /app/f$i; i=$((i+1)); done",
    "find / -xdev -type f | wc -l > /app/count",
    "tar -cf /app/bin.tar /usr/bin && mkdir /app/x && tar -xf /app/bin.tar -C /app/x && rm /app/bin.tar",
    "ln /one /app/one-link && chmod 4755 /app/f1 && mv /app/etc /app/etc-moved",
    "rm -rf /app/x /app/f1?* && echo done > /bench-done",
]


def containerfile() -> str:
    runs = "".join(f'RUN ["{TOOLS}/sh", "-c", "{s}"]\n' for s in STEPS)
    return f"FROM {IMAGE}\n{runs}"


def podman_user() -> pwd.struct_passwd:
    """The unprivileged user rootless podman runs as (the tests' user; created if missing)."""
    try:
        return pwd.getpwnam(PODMAN_USER)
    except KeyError:
        home = f"/var/tmp/{PODMAN_USER}-home"
        p = subprocess.run(["useradd", "--system", "--create-home", "--home-dir", home, "--shell", "/bin/sh",
                            PODMAN_USER], capture_output=True, text=True)
        if p.returncode != 0:
            raise BenchError(f"useradd {PODMAN_USER}: {p.stderr.strip()}") from None
        return pwd.getpwnam(PODMAN_USER)


def _podman(env: PodmanEnv, *args: str, timeout: float = 300) -> str:
    """stdout of `podman ARGS`; a failure becomes the row's n/a reason."""
    try:
        return env.run(*args, timeout=timeout).stdout
    except PodmanError as e:
        raise BenchError(str(e)) from None


class PodmanRows:
    """One rootless podman set-up per target, made on first use, closed by finish()."""

    def __init__(self) -> None:
        self.envs: dict[str, PodmanEnv] = {}
        self.broken: dict[str, str] = {}
        self.count: str | None = None   # what step 5 of the build counted: the same on every target

    def applies(self, t: Target) -> str | None:
        if not isinstance(t, FuseProgram) or t.name not in FSTYPES:
            return "not a mount program"
        if not is_root():
            return "rootless podman rows set up their user: run as root"
        missing = missing_tools(rootless=True)
        return f"missing {', '.join(missing)}" if missing else None

    def env(self, c: Ctx) -> PodmanEnv:
        name = c.target.name
        if name in self.broken:
            raise BenchError(self.broken[name])
        if name not in self.envs:
            try:
                self.envs[name] = self._make(c, self._base(c.scratch.parent, name))
            except (BenchError, PodmanError, OSError) as e:
                self.broken[name] = f"podman set-up: {e}"
                raise BenchError(self.broken[name]) from e
        return self.envs[name]

    @staticmethod
    def _base(scratch: Path, name: str) -> Path:
        """Under the run's scratch directory (the fresh filesystem made for writes) when
        the podman user can reach it, else in /var/tmp (e.g. a --cache under a 0700 dir)."""
        if all(os.stat(p).st_mode & 0o001 for p in (scratch, *scratch.parents)):
            return scratch / f"podman-{name}"
        log(f"{name}: podman's user cannot reach {scratch}; its set-up goes to /var/tmp")
        base = Path(tempfile.mkdtemp(prefix=f"fusesnap-bench-podman-{name}-", dir="/var/tmp"))
        base.chmod(0o711)
        return base

    def _make(self, c: Ctx, base: Path) -> PodmanEnv:
        assert isinstance(c.target, FuseProgram) and c.target.program
        env = PodmanEnv(base / "env", c.target.program, podman_user())
        self.envs[c.target.name] = env   # closed by finish() even if the rest fails
        env.create()
        archive = base / "image.tar"
        archive.parent.mkdir(parents=True, exist_ok=True)
        tools = layer_tar([Entry(".bench", "dir", mode=0o755), *busybox_entries(TOOLS.lstrip("/"), APPLETS)])
        write_oci_archive(archive, [*(Path(t) for t in c.ws.stacks["rootfs"].tars), tools], IMAGE,
                          {"Env": [f"PATH={TOOLS}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]})
        archive.chmod(0o644)
        env.run("load", "-i", str(archive), timeout=1800)
        ctx = base / "context"
        ctx.mkdir()
        (ctx / "Containerfile").write_text(containerfile())
        ctx.chmod(0o755)
        (ctx / "Containerfile").chmod(0o644)
        out = env.run("run", "--rm", IMAGE, f"{TOOLS}/cat", "/proc/self/mountinfo").stdout
        root = [line.split(" - ", 1)[1].split()[0] for line in out.splitlines() if line.split()[4:5] == ["/"]]
        if root[-1:] != [FSTYPES[c.target.name]]:
            raise BenchError(f"the container's root is {root[-1:] or 'not mounted'}, not {FSTYPES[c.target.name]}")
        return env

    def run_true(self, c: Ctx) -> float:
        env = self.env(c)
        t0 = time.perf_counter()
        _podman(env, "run", "--rm", IMAGE, "true")
        return time.perf_counter() - t0

    def build(self, c: Ctx) -> float:
        env = self.env(c)
        ctx = env.base.parent / "context"
        t0 = time.perf_counter()
        _podman(env, "build", "--no-cache", "--network", "none", "-t", BUILT, str(ctx), timeout=3600)
        dt = time.perf_counter() - t0
        out = _podman(env, "run", "--rm", BUILT, "cat", "/bench-done", "/app/count").split()
        _podman(env, "rmi", BUILT)
        _podman(env, "image", "prune", "--force")
        if out[:1] != ["done"] or len(out) != 2:
            raise BenchError(f"wrong result: the built image holds {out!r}")
        if self.count is None:
            self.count = out[1]
        elif out[1] != self.count:
            raise BenchError(f"wrong result: the build counted {out[1]} files, another target {self.count}")
        return dt

    def finish(self) -> None:
        for env in self.envs.values():
            env.close()
            rmtree(env.base.parent)
        self.envs.clear()


ROWS = PodmanRows()

PODMAN_WORKLOADS = [
    Workload("podman-run", "podman run --rm IMG true (rootless, mount_program)", "rootfs", "s", "tool", False,
             ROWS.run_true, applies=ROWS.applies, timed_inside=True, finish=ROWS.finish),
    Workload("podman-build", f"podman build, {len(STEPS)} RUN steps (rootless, mount_program)", "rootfs", "s",
             "tool", False, ROWS.build, applies=ROWS.applies, timed_inside=True, finish=ROWS.finish),
]
