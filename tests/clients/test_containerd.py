"""containerd runs containers on `fusesnap serve`: a real containerd 1.6 with a [proxy_plugins] entry.

One containerd and one daemon per module (they take seconds to start); each
test uses its own image names, container ids and namespaces.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from containerd_env import (Containerd, FusesnapServe, base_layers, missing_tools, oci_archive, push_archive,
                            store_mounts, tool_path, wait_for)
from helpers import script, unmount
from registry import start_registry

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools()))

SN = "--snapshotter=fusesnap"
IMAGE = "docker.io/fusesnap/fstest:1"


class Stack:
    def __init__(self, base: Path, mounts: str) -> None:
        self.base = base
        self.serve = FusesnapServe(base / "store", base / "fusesnap.sock", base / "fusesnap.log", mounts)
        self.containerd = Containerd(base / "containerd", self.serve.address)
        self.containerd.base.mkdir()

    @property
    def other_ns(self) -> str:
        return self.containerd.namespace + "-other"

    def ctr(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.containerd.ctr(*args, **kw)

    def out(self, *args: str, **kw) -> str:
        return self.ctr(*args, **kw).stdout.decode()


def assert_fsck_clean(stack: Stack) -> None:
    """fsck finds nothing once containerd's garbage collection (it removes snapshots from the
    snapshotter in the background, after ctr returned) has settled."""
    def clean() -> bool:
        r = subprocess.run([script("fusesnap"), "--root", str(stack.serve.root), "--json", "fsck"],
                           capture_output=True, text=True)
        report.update(json.loads(r.stdout))
        return r.returncode == 0 and report["ok"] and report["problems"] == []
    report: dict = {}
    try:
        wait_for(clean, 20, "fsck clean")
    except RuntimeError:
        raise AssertionError(report) from None


@pytest.fixture(scope="module", params=["bind", "fuse3"])
def stack(request):
    """Both mount modes of the daemon: its own mounts handed out as binds, and fuse3.fusesnap
    mounts that containerd makes through mount.fuse3."""
    base = Path(tempfile.mkdtemp(prefix="fusesnap-ctrd-", dir="/var/tmp"))
    s = Stack(base, request.param)
    s.serve.start()
    s.containerd.start()
    archive = oci_archive(base / "fstest.tar", IMAGE, base_layers(), base)
    s.ctr("images", "import", SN, str(archive))
    yield s
    for ns in (s.containerd.namespace, s.other_ns):
        for cid in s.out("containers", "ls", "-q", namespace=ns, check=False).split():
            s.ctr("tasks", "kill", "-s", "KILL", cid, namespace=ns, check=False)
            s.ctr("tasks", "delete", "-f", cid, namespace=ns, check=False)
            s.ctr("containers", "delete", cid, namespace=ns, check=False)
    s.containerd.stop()
    if s.serve.proc is not None:
        s.serve.stop()
    for mp in sorted(store_mounts(s.serve.root) + _mounts_under(base), key=len, reverse=True):
        unmount(mp)
    shutil.rmtree(base, ignore_errors=True)


def _mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(base))]


def run(stack: Stack, cid: str, script_text: str, image: str = IMAGE, namespace: str | None = None,
        rm: bool = True) -> str:
    args = ["run", SN] + (["--rm"] if rm else []) + [image, cid, "sh", "-c", script_text]
    return stack.out(*args, namespace=namespace)


def test_run_reads_the_image_and_writes(stack):
    out = run(stack, "reader", "cat /etc/base-file; ls /opq; test -e /etc/to-delete || echo gone; "
              "test -e /deldir || echo dir-gone; stat -c %h /etc/hard; "
              "echo new > /new-file; cat /new-file; rm /etc/base-file; test -e /etc/base-file || echo deleted")
    assert out.split("\n") == ["changed in layer 3", "new-c", "gone", "dir-gone", "2", "new", "deleted", ""]
    # --rm removed the container's snapshot (containerd's garbage collector removes it from the
    # snapshotter soon after); nothing of it stays mounted
    wait_for(lambda: store_mounts(stack.serve.root) == [], 30, "the container's mount to go")
    assert "reader" not in stack.out("snapshots", SN, "ls")


def test_snapshots_commands_and_a_commit_seen_by_a_second_container(stack, tmp_path):
    run(stack, "writer", "echo from-writer > /from-writer; rm /etc/base-file; mkdir -p /opq/sub", rm=False)
    info = json.loads(stack.out("snapshots", SN, "info", "writer"))
    assert info["Kind"] == "Active" and info["Parent"].startswith("sha256:")
    ls = stack.out("snapshots", SN, "ls")
    assert any(line.split()[:3] == ["writer", info["Parent"], "Active"] for line in ls.splitlines())
    usage = stack.out("snapshots", SN, "usage", "writer").splitlines()
    assert usage[0].split()[:3] == ["KEY", "SIZE", "INODES"] and usage[1].split()[0] == "writer"
    assert int(usage[1].split()[-1]) >= 3          # the new file, the whiteout, the new dir
    stack.ctr("containers", "delete", "writer")    # removes its snapshot too
    run(stack, "writer2", "echo from-writer > /from-writer; rm /etc/base-file; mkdir -p /opq/sub", rm=False)
    stack.ctr("snapshots", SN, "commit", "writer-committed", "writer2")
    committed = json.loads(stack.out("snapshots", SN, "info", "writer-committed"))
    assert committed["Kind"] == "Committed" and committed["Parent"] == info["Parent"]

    # a second container from the commit: prepare, mount as containerd would, run on that rootfs
    stack.ctr("snapshots", SN, "prepare", "second-rootfs", "writer-committed")
    mp = tmp_path / "rootfs"
    mp.mkdir()
    cmd = stack.out("snapshots", SN, "mounts", str(mp), "second-rootfs").split()
    if stack.serve.mounts == "bind":
        assert cmd[:3] == ["mount", "-t", "bind"] and cmd[4:] == [str(mp), "-o", "rbind,rw"], cmd
        subprocess.run(cmd, check=True)
    else:
        assert cmd[:5] == ["mount", "-t", "fuse3.fusesnap", "fusesnap", str(mp)] and cmd[5] == "-o", cmd
        # containerd 1.6 performs a fuse3.PROG mount as `mount.fuse3 SOURCE TARGET -o OPTS -t PROG`
        subprocess.run(["mount.fuse3", "fusesnap", str(mp), "-o", cmd[6], "-t", "fusesnap"], check=True,
                       env={"PATH": tool_path()})
    try:
        out = stack.out("run", "--rm", "--rootfs", "--env", "PATH=/bin", str(mp), "second", "/bin/sh", "-c",
                        "cat /from-writer; test -e /etc/base-file || echo base-gone; ls /opq")
        assert out.split() == ["from-writer", "base-gone", "new-c", "sub"]
        r = stack.ctr("snapshots", SN, "rm", "writer-committed", check=False)
        assert r.returncode != 0 and b"failed precondition" in r.stderr.lower()
    finally:
        unmount(mp)
    stack.ctr("snapshots", SN, "rm", "second-rootfs")
    stack.ctr("snapshots", SN, "rm", "writer-committed")
    stack.ctr("containers", "delete", "writer2", check=False)
    assert "writer" not in stack.out("snapshots", SN, "ls")
    assert_fsck_clean(stack)


def test_pull_from_a_registry(stack):
    reg = start_registry(stack.base / "registry")
    try:
        layers = base_layers(extra_bytes=256 * 1024)     # other layers than the imported image
        archive = oci_archive(stack.base / "pull.tar", "docker.io/fusesnap/pull:1", layers, stack.base)
        push_archive(reg, archive, "fusesnap/pull:1")
        ref = f"{reg.host}/fusesnap/pull:1"
        stack.ctr("images", "pull", "--plain-http", SN, ref, timeout=300)
        out = stack.out("run", "--rm", SN, ref, "pulled", "sh", "-c", "wc -c < /blob/random; cat /etc/base-file")
        assert out.split() == [str(256 * 1024), "changed", "in", "layer", "3"]
        # pulled again in another namespace: extracted again; the base layer (no deletions, so
        # the same changeset bytes) is stored once. Layers with whiteouts commit with the time of
        # the deletion and so become new layers.
        layers_before = _store_layers(stack)
        stack.ctr("images", "pull", "--plain-http", SN, ref, namespace=stack.other_ns, timeout=300)
        assert len(_committed_records(stack, stack.other_ns + "/")) == 3
        assert not any(stack_layer_parent(stack, c) == "" for c in _store_layers(stack) - layers_before)
        out = stack.out("run", "--rm", SN, ref, "pulled-other", "sh", "-c", "wc -c < /blob/random",
                        namespace=stack.other_ns)
        assert out.split() == [str(256 * 1024)]
        # containerd's garbage collection of the other namespace's image leaves this one whole
        stack.ctr("images", "rm", "--sync", ref, namespace=stack.other_ns)
        assert _committed_records(stack, stack.other_ns + "/") == {}
        out = stack.out("run", "--rm", SN, ref, "pulled-again", "sh", "-c", "wc -c < /blob/random")
        assert out.split() == [str(256 * 1024)]
    finally:
        reg.stop()


def _store_layers(stack: Stack) -> set[str]:
    r = subprocess.run([script("fusesnap"), "--root", str(stack.serve.root), "--json", "layers"],
                       capture_output=True, text=True, check=True)
    return {li["chain_id"] for li in json.loads(r.stdout)}


def stack_layer_parent(stack: Stack, chain: str) -> str:
    r = subprocess.run([script("fusesnap"), "--root", str(stack.serve.root), "--json", "inspect", chain],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["parent"] or ""


def _committed_records(stack: Stack, prefix: str) -> dict[str, dict]:
    r = subprocess.run([script("fusesnap"), "--root", str(stack.serve.root), "--json", "list", "kind==committed"],
                       capture_output=True, text=True, check=True)
    return {i["name"]: i["labels"] for i in json.loads(r.stdout) if i["name"].startswith(prefix)}


def test_daemon_restart_while_a_container_runs(stack):
    stack.ctr("run", "-d", SN, IMAGE, "long", "sh", "-c", "echo before > /state; sleep 600")
    try:
        assert stack.out("tasks", "exec", "--exec-id", "e1", "long", "cat", "/state").strip() == "before"
        stack.serve.stop(signal.SIGTERM)
        assert not stack.serve.address.exists()          # a clean stop removes its socket
        stack.serve.start()
        # containerd's client reconnects (calls in between fail as unavailable)
        wait_for(lambda: stack.ctr("snapshots", SN, "info", "long", check=False).returncode == 0, 30,
                 "containerd reconnecting to the restarted daemon")
        # the running container never noticed; containerd finds its snapshot again
        assert stack.out("tasks", "exec", "--exec-id", "e2", "long", "sh", "-c",
                         "cat /state; echo after > /state2; cat /state2").split() == ["before", "after"]
        assert json.loads(stack.out("snapshots", SN, "info", "long"))["Kind"] == "Active"
        assert len(store_mounts(stack.serve.root)) == (2 if stack.serve.mounts == "bind" else 1)
    finally:
        stack.ctr("tasks", "kill", "-s", "KILL", "long", check=False)
        threading.Event().wait(0.5)
        stack.ctr("tasks", "delete", "-f", "long", check=False)
        stack.ctr("containers", "delete", "long")
    wait_for(lambda: store_mounts(stack.serve.root) == [], 30, "the container's mount to go")
    assert "long" not in stack.out("snapshots", SN, "ls")
