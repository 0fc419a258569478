"""A private podman (rootless as an unprivileged user, or root) whose overlay driver
mounts through a given mount program: the recipe of README "Use with podman", in a
directory of its own, so that nothing touches the machine's own podman state.

Rootless: the user's ~/.config/containers/{storage,containers}.conf under a private
HOME and XDG_RUNTIME_DIR (containers/storage ignores `graphroot` in a file named by
CONTAINERS_STORAGE_CONF for rootless users, but honours the user's own file). Root:
the same two files named by CONTAINERS_STORAGE_CONF and CONTAINERS_CONF.

Stdlib only: scripts/bench.py and the tests in tests/clients both use it.
"""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

# podman 4.3 lowers its own RLIMIT_NPROC to this at start; a container may not get more.
PODMAN_NPROC = 32768
SUBID_COUNT = 65536
SUBID_FIRST = 100000


class PodmanError(Exception):
    """A podman command failed; the message names the command and its last stderr line."""


def missing_tools(rootless: bool) -> list[str]:
    """What a podman set-up needs and this machine lacks (Debian packages in brackets)."""
    need = {"podman": "podman", "runc": "runc", "conmon": "conmon"}
    if rootless:
        need.update({"newuidmap": "uidmap", "newgidmap": "uidmap"})
    return [f"{tool} ({pkg})" for tool, pkg in need.items() if not shutil.which(tool, path=_SBIN_PATH)]


_SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _subid_ranges(path: str) -> list[tuple[str, int, int]]:
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def ensure_subids(user: pwd.struct_passwd) -> None:
    """Give the user 65536 subordinate uids and gids (rootless podman maps them into its
    user namespace) unless /etc/subuid and /etc/subgid already do. Needs root."""
    have = []
    for path in ("/etc/subuid", "/etc/subgid"):
        ranges = _subid_ranges(path)
        mine = [n for name, _, n in ranges if name in (user.pw_name, str(user.pw_uid))]
        have.append(bool(mine) and max(mine) >= SUBID_COUNT)
    if all(have):
        return
    ends = [s + n for f in ("/etc/subuid", "/etc/subgid") for _, s, n in _subid_ranges(f)]
    first = max([SUBID_FIRST] + ends)
    span = f"{first}-{first + SUBID_COUNT - 1}"
    args = []
    if not have[0]:
        args += ["--add-subuids", span]
    if not have[1]:
        args += ["--add-subgids", span]
    p = subprocess.run(["usermod", *args, user.pw_name], capture_output=True, text=True)
    if p.returncode != 0:
        raise PodmanError(f"usermod {' '.join(args)} {user.pw_name}: {p.stderr.strip()}")


def default_ulimits() -> list[str]:
    """Limits a rootful container may get here: podman's defaults (nofile 1048576) need
    CAP_SYS_RESOURCE, which a root without it (a CI container) lacks."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], PODMAN_NPROC)
    limits = []
    for name, v in (("nofile", nofile), ("nproc", nproc)):
        if v != resource.RLIM_INFINITY and v > 0:
            limits.append(f"{name}={v}:{v}")
    return limits


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{x}"' for x in items) + "]"


class PodmanEnv:
    """One podman set-up in base/: graphroot, configuration, and (rootless) its own HOME
    and XDG_RUNTIME_DIR; its runroot in a short directory under /tmp. `user` None means root; `mount_program` None means
    the kernel's overlayfs (podman's native overlay driver)."""

    def __init__(self, base: Path, mount_program: str | None, user: pwd.struct_passwd | None = None) -> None:
        self.base = Path(base)
        self.mount_program = mount_program
        self.user = user
        self.graph = self.base / "graph"
        self.runroot = Path("/nonexistent")   # made by create(): short, see there
        self.home = self.base / "home"
        self.xdg = self.base / "xdg"
        self.conf = (self.home / ".config" / "containers") if user else (self.base / "conf")

    @property
    def rootless(self) -> bool:
        return self.user is not None

    def storage_conf(self) -> str:
        text = f'[storage]\ndriver = "overlay"\ngraphroot = "{self.graph}"\nrunroot = "{self.runroot}"\n'
        if self.mount_program:
            # containers may run as other users: a FUSE mount lets them in only when asked
            # (fusesnap-overlay mounts for its owner alone by default, root included)
            text += (f'\n[storage.options.overlay]\nmount_program = "{self.mount_program}"\n'
                     'mountopt = "allow_other"\n')
        return text

    def containers_conf(self) -> str:
        # netns "none": no /dev/net/tun (slirp4netns) here; cgroupfs: no systemd user session
        text = '[containers]\nnetns = "none"\n'
        if not self.rootless:
            text += f"default_ulimits = {_toml_list(default_ulimits())}\n"
            # podman's own state under base, not /run/libpod and /etc/cni
            text += f'\n[network]\nnetwork_config_dir = "{self.base / "net"}"\n'
        text += '\n[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\nruntime = "runc"\n'
        if not self.rootless:
            text += f'tmp_dir = "{self.base / "tmp"}"\n'
        return text

    def create(self) -> "PodmanEnv":
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o711)
        # podman's `container cleanup` (the exit command conmon runs) refuses a runroot
        # longer than 50 characters; `podman run --rm` then waits 20 s for a cleanup
        # that never comes. Sockets live there: keep it short, whatever base is.
        self.runroot = Path(tempfile.mkdtemp(prefix="podman-run-", dir="/tmp"))
        self.conf.mkdir(parents=True, exist_ok=True)
        (self.conf / "storage.conf").write_text(self.storage_conf())
        (self.conf / "containers.conf").write_text(self.containers_conf())
        if self.user:
            ensure_subids(self.user)
            for d in (self.graph, self.xdg):
                d.mkdir(exist_ok=True)
            for d in (self.graph, self.runroot, self.xdg, self.home, *self.home.rglob("*")):
                os.chown(d, self.user.pw_uid, self.user.pw_gid)
            for d in (self.xdg, self.home):
                os.chmod(d, 0o700)
            if os.geteuid() == 0:
                self._start_pause_process()
        return self

    def _start_pause_process(self) -> None:
        """Start rootless podman's pause process (the holder of its user and mount
        namespaces) from a mount namespace without FUSE mounts. A new mount namespace
        copies every mount live at that moment, and where / is not a shared mount no
        unmount ever reaches the copies: a FUSE daemon whose mount was live then (another
        test's, another user's) would not see its unmount until the pause process exits.
        Later podman commands join the pause process's namespaces."""
        assert self.user is not None
        detach = "awk '$0 ~ / - fuse/ {print $5}' /proc/self/mountinfo | xargs -r -n1 umount -l"
        run_as = f"exec setpriv --reuid={self.user.pw_uid} --regid={self.user.pw_gid} --clear-groups"
        self.command(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                      f"{detach}; {run_as} podman unshare true"], as_root=True)

    def environ(self) -> dict[str, str]:
        env = {"PATH": _SBIN_PATH, "LANG": "C.UTF-8", "TMPDIR": "/var/tmp"}
        if self.user:
            env.update({"HOME": str(self.home), "USER": self.user.pw_name, "LOGNAME": self.user.pw_name,
                        "XDG_RUNTIME_DIR": str(self.xdg), "XDG_CONFIG_HOME": str(self.home / ".config"),
                        "XDG_DATA_HOME": str(self.home / ".local" / "share")})
        else:
            env.update({"HOME": "/root", "CONTAINERS_CONF": str(self.conf / "containers.conf"),
                        "CONTAINERS_STORAGE_CONF": str(self.conf / "storage.conf")})
        return env

    def popen_args(self, as_root: bool = False) -> dict[str, object]:
        """What subprocess needs to run a command as this set-up's user, in its environment."""
        kw: dict[str, object] = {"env": self.environ(), "cwd": "/"}
        if self.user and not as_root:
            kw.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        return kw

    def run(self, *args: str, input: bytes | str | None = None, check: bool = True, timeout: float = 300,
            stdin=None, text: bool = True) -> subprocess.CompletedProcess:
        """`podman ARGS` as this set-up's user; PodmanError (last stderr line) when it fails."""
        return self.command(["podman", *args], input=input, check=check, timeout=timeout, stdin=stdin, text=text)

    def command(self, argv: list[str], input: bytes | str | None = None, check: bool = True, timeout: float = 300,
                stdin=None, text: bool = True, as_root: bool = False) -> subprocess.CompletedProcess:
        kw = self.popen_args(as_root)
        if input is None and stdin is None:
            stdin = subprocess.DEVNULL
        try:
            p = subprocess.run(argv, input=input, stdin=stdin, capture_output=True, text=text, timeout=timeout,
                               **kw)  # type: ignore[call-overload]
        except subprocess.TimeoutExpired as e:
            raise PodmanError(f"{' '.join(argv[:3])}: timed out after {timeout:.0f}s") from e
        if check and p.returncode != 0:
            err = p.stderr if text else p.stderr.decode(errors="replace")
            lines = [x for x in err.splitlines() if x.strip() and "is not a shared mount" not in x]
            raise PodmanError(f"{' '.join(argv[:3])} exited {p.returncode}: {lines[-1] if lines else ''}")
        return p

    def pause_pid(self) -> int | None:
        """Rootless podman's pause process (holder of its user and mount namespaces)."""
        try:
            return int((self.xdg / "libpod" / "tmp" / "pause.pid").read_text())
        except (OSError, ValueError):
            return None

    def close(self, timeout: float = 60) -> None:
        """Remove every container and image mount, stop what this set-up started (the
        pause process, daemons of mounts still alive), delete base/."""
        for args in (["rm", "--all", "--force", "--time", "0"], ["image", "umount", "--all", "--force"]):
            try:
                self.run(*args, check=False, timeout=timeout)
            except PodmanError:
                pass
        if self.rootless:
            try:  # mounts live in podman's mount namespace: unmount them there
                self.command(["podman", "unshare", "sh", "-c",
                              f"awk '{{print $5}}' /proc/self/mountinfo | grep '^{self.base}/' | sort -r"
                              " | xargs -r -n1 umount -l"], check=False, timeout=timeout)
            except PodmanError:
                pass
            pid = self.pause_pid()
            if pid and _owned_by(pid, self.user.pw_uid):  # type: ignore[union-attr]
                _kill(pid)
        for pid in processes_naming(f"{self.base}/"):   # whatever podman left running
            _kill(pid)
        with open("/proc/self/mountinfo") as f:
            mps = [line.split()[4] for line in f]
        ours = [m for m in mps if m.startswith((f"{self.base}/", f"{self.runroot}/"))]
        for mp in sorted(ours, key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(self.runroot, ignore_errors=True)


def _owned_by(pid: int, uid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == uid
    except OSError:
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX":
                return
        except OSError:
            return
        time.sleep(0.02)


def processes_naming(text: str) -> list[int]:
    """Live processes (not zombies) whose command line contains text: a mount's FUSE
    daemon names its directories, conmon its container's."""
    key = text.encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes()
            state = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if key in argv and state not in "ZX":
            out.append(int(d))
    return out
