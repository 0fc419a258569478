"""Everything that decides what a process may do and what it sees, as one comparable value.

The mount server (cli/mountserver.py) forks daemons for its clients; a daemon
has the server's credentials, namespaces, cgroup, root, limits and LSM label,
not the client's. So a client uses only a server whose context equals its own
(the context picks the server's socket name), and the server serves only a
peer whose context equals its own: a sandboxed process of the same user (other
namespaces, fewer capabilities, seccomp, a chroot, another AppArmor profile)
never gets a daemon with more than it has. Stdlib `os` only: the mount
command's start-up path computes this before anything heavy is imported.
"""

import os

_NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")
_STATUS = (b"Uid:", b"Gid:", b"Groups:", b"CapInh:", b"CapPrm:", b"CapEff:", b"CapBnd:", b"CapAmb:",
           b"NoNewPrivs:", b"Seccomp:")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b"-"


def context(pid: int | str = "self") -> bytes:
    """The context of process pid (default: this one). Equal bytes, equal powers."""
    base = f"/proc/{pid}"
    parts = [line for line in _read(f"{base}/status").splitlines() if line.startswith(_STATUS)]
    for ns in _NAMESPACES:
        try:
            parts.append(os.fsencode(os.readlink(f"{base}/ns/{ns}")))
        except OSError:
            parts.append(b"-")
    try:
        st = os.stat(f"{base}/root")
        parts.append(b"root %d:%d" % (st.st_dev, st.st_ino))
    except OSError:
        parts.append(b"root -")
    for name in ("cgroup", "limits", "oom_score_adj", "attr/current"):
        parts.append(_read(f"{base}/{name}"))
    return b"\n".join(parts)
