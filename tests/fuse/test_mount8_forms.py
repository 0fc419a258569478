"""The mount(8) forms the README documents (issue 13, item 15).

mount(8) runs mount.fuse3 with PATH reset to the system's, so the programs must
be found in /usr/local/bin, where scripts/setup links them. The forms run inside
a private mount namespace whose /usr/local/bin holds links to this venv's
scripts: another checkout's setup on the same machine cannot change what runs,
and nothing leaks into the host's mount table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import fusesnap_ok, is_root
from unionmount import layout, overlay_opts

pytestmark = pytest.mark.skipif(not is_root(), reason="mount(8) of FUSE types needs root")

BIN = Path(sys.executable).parent


def _in_private_namespace(base: Path, steps: str) -> subprocess.CompletedProcess:
    links = base / "bin"
    links.mkdir()
    for name in ("fusesnap", "fusesnap-overlay"):
        os.symlink(BIN / name, links / name)
    script_ = f"set -e\nmount --bind {links} /usr/local/bin\n{steps}"
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script_], cwd=base,
                          capture_output=True, text=True, timeout=120, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def test_mount_t_fuse_fusesnap_overlay(shared_tmp):
    lowers, upper, work, mp = layout(shared_tmp / "o")
    (lowers[0] / "hello").write_text("from the lower\n")
    opts = overlay_opts(lowers, upper, work)
    r = _in_private_namespace(shared_tmp, f"""
mount -t fuse.fusesnap-overlay fusesnap-overlay {mp} -o {opts}
cat {mp}/hello
echo written > {mp}/new
grep " {mp} " /proc/self/mountinfo
umount {mp}
PATH=/usr/local/bin:$PATH mount.fuse3 fusesnap-overlay {mp} -t fusesnap-overlay -o {opts},ro
cat {mp}/new
umount {mp}
""")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "from the lower" and out[2] == "written", r.stdout
    assert "fuse.fusesnap" in out[1], out[1]
    assert (upper / "new").read_text() == "written\n"


def test_mount_t_fuse_fusesnap_with_the_options_mounts_prints(shared_tmp, test_user):
    """What a container runtime does; root's mount lets a container's other users in."""
    root, mp, tar = shared_tmp / "root", shared_tmp / "mp", shared_tmp / "l.tar"
    src = shared_tmp / "src"
    src.mkdir()
    mp.mkdir()
    (src / "base").write_text("base\n")
    subprocess.run(["tar", "-C", str(src), "-cf", str(tar), "base"], check=True)

    chain = fusesnap_ok(root, "import", str(tar)).split()[0]
    fusesnap_ok(root, "prepare", "k", chain)
    (m,) = json.loads(fusesnap_ok(root, "mounts", "k"))
    # a file named like the source in mount(8)'s cwd: mount passes its absolute path instead
    (shared_tmp / "fusesnap").write_text("")
    assert m["type"] == "fuse3.fusesnap" and m["source"] == "fusesnap"
    opts = ",".join(m["options"])
    r = _in_private_namespace(shared_tmp, f"""
mount -t fuse.fusesnap fusesnap {mp} -o {opts}
setpriv --reuid={test_user.pw_uid} --regid={test_user.pw_gid} --clear-groups cat {mp}/base
echo changed > {mp}/base
umount {mp}
PATH=/usr/local/bin:$PATH mount.fuse3 fusesnap {mp} -t fusesnap -o {opts}
cat {mp}/base
umount {mp}
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["base", "changed"], r.stdout
    fusesnap_ok(root, "remove", "k")    # no daemon is left holding the snapshot


def test_setup_linked_the_console_scripts_for_mount8():
    """scripts/setup links the scripts into /usr/local/bin, mount(8)'s PATH."""
    for name in ("fusesnap", "fusesnap-overlay"):
        link = Path("/usr/local/bin") / name
        assert link.exists(), f"{link} missing: scripts/setup links it (FUSESNAP_BIN_LINKS)"
        target = Path(os.path.realpath(link))
        if target.parent != BIN.resolve():
            pytest.skip(f"{link} belongs to another installation ({target}) on this machine")
        assert os.access(link, os.X_OK)
