"""`fusesnap serve` as containerd's client sees it: status codes, streaming, labels, socket, signals."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from fusesnap.daemon.client import RemoteSnapshotter, perform
from fusesnap.daemon.pb import snapshots_pb2 as pb, snapshots_pb2_grpc as pb_grpc
from helpers import run_as, script, user_env, wait_for

REF = "containerd.io/snapshot.ref"


class Served:
    def __init__(self, tmp: Path, mounts: str = "bind", env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        """log: -vv, its stderr to that file (a pipe nobody reads would fill up)."""
        self.root, self.sock = tmp / "root", tmp / "run" / "fusesnap.sock"
        self.log = log
        self.proc = subprocess.Popen([script("fusesnap"), "--root", str(self.root), *(["-vv"] if log else []),
                                      "serve", "--mounts", mounts, "--address", str(self.sock)],
                                     stdout=subprocess.PIPE, stderr=open(log, "wb") if log else subprocess.PIPE,
                                     env=None if env is None else {**os.environ, **env})
        self.client = RemoteSnapshotter(self.sock)
        self.client.wait_ready(30)
        self.channel = grpc.insecure_channel(f"unix:{self.sock}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)

    def code(self, method: str, request: object) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as ei:
            getattr(self.stub, method)(request, timeout=30)
        return ei.value.code()

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.client.close()
        self.channel.close()
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, self.log.read_text() if self.log else err.decode()


@pytest.fixture
def served(shared_tmp):
    s = Served(shared_tmp)
    yield s
    if s.proc.poll() is None:
        s.stop()


def test_errors_carry_the_codes_containerd_reads(served):
    c = served.client
    c.prepare("a")
    c.commit("base", "a")
    c.prepare("child", "base")
    assert served.code("Stat", pb.StatSnapshotRequest(key="missing")) == grpc.StatusCode.NOT_FOUND
    assert served.code("Mounts", pb.MountsRequest(key="missing")) == grpc.StatusCode.NOT_FOUND
    assert served.code("Prepare", pb.PrepareSnapshotRequest(key="child", parent="base")) == \
        grpc.StatusCode.ALREADY_EXISTS
    assert served.code("Commit", pb.CommitSnapshotRequest(name="base", key="child")) == \
        grpc.StatusCode.ALREADY_EXISTS
    # a parent with children cannot go: containerd's "cannot remove snapshot with child"
    assert served.code("Remove", pb.RemoveSnapshotRequest(key="base")) == grpc.StatusCode.FAILED_PRECONDITION
    assert served.code("Prepare", pb.PrepareSnapshotRequest(key="x", parent="child")) == \
        grpc.StatusCode.INVALID_ARGUMENT        # parent is not committed
    assert served.code("Prepare", pb.PrepareSnapshotRequest(key="y", labels={"k": "v" * 5000})) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert served.code("Update", pb.UpdateSnapshotRequest(info=pb.Info(name="child"), update_mask={"paths": ["kind"]})) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert served.code("Prepare", pb.PrepareSnapshotRequest(key="")) == grpc.StatusCode.INVALID_ARGUMENT
    list(served.stub.List(pb.ListSnapshotsRequest(filters=["kind==active"]), timeout=30))
    with pytest.raises(grpc.RpcError) as ei:
        list(served.stub.List(pb.ListSnapshotsRequest(filters=["labels.=="]), timeout=30))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert served.stop() [0] == 0


def test_list_streams_in_batches_and_filters(shared_tmp):
    served = Served(shared_tmp, mounts="fuse3")      # 230 snapshots: no mount for each
    c = served.client
    try:
        for i in range(230):
            mounts = c.prepare(f"s{i:03}", labels={"even": str(i % 2 == 0).lower()})
        assert mounts[0].type == "fuse3.fusesnap" and "snapshot=s229" in mounts[0].options
        batches = list(served.stub.List(pb.ListSnapshotsRequest(), timeout=60))
        assert [len(b.info) for b in batches] == [100, 100, 30]
        evens = c.list("labels.even==true", "name==s001")
        assert len(evens) == 116 and {i.kind for i in evens} == {"active"}
    finally:
        assert served.stop()[0] == 0


def test_update_and_usage(served):
    c = served.client
    mounts = c.prepare("k", labels={"a": "1", "b": "2"})
    # the daemon mounted the snapshot itself and hands out a bind of it
    assert [(m.type, m.options) for m in mounts] == [("bind", ["rbind", "rw"])]
    assert os.path.ismount(mounts[0].source) and c.mounts("k") == mounts
    info = c.stat("k")
    info.labels = {"a": "changed", "c": "3"}
    after = c.update(info, "labels.a", "labels.b")
    assert after.labels == {"a": "changed"} and after.updated > after.created
    assert c.update(info).labels == {"a": "changed", "c": "3"}
    Path(mounts[0].source, "f").write_bytes(b"x" * 10000)
    u = c.usage("k")
    assert u.inodes == 1 and u.size >= 10000


def test_a_layer_containerd_is_about_to_extract_again_is_adopted(served):
    """containerd's remote-snapshot protocol: Prepare with the layer's chainID in the ref label gets
    AlreadyExists when that layer was committed on the same parent; containerd then finds it by listing."""
    c = served.client
    chain = "sha256:" + "ab" * 32
    c.prepare("ns/1/extract-1 " + chain, "", {REF: chain})
    c.commit("ns/2/" + chain, "ns/1/extract-1 " + chain)
    assert c.stat("ns/2/" + chain).labels == {REF: chain}     # the commit kept the ref label
    code = served.code("Prepare", pb.PrepareSnapshotRequest(key="other/1/extract-2 " + chain, labels={REF: chain}))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    found = c.list(f'labels."{REF}"=={chain},parent==')
    assert [i.name for i in found] == ["ns/2/" + chain]
    # on another parent the layer is a different snapshot: extracted as usual
    c.prepare("p", "")
    c.commit("other-parent", "p")
    c.prepare("ns/3/extract-3 " + chain, "other-parent", {REF: chain})


def test_socket_mode_stale_socket_and_a_second_daemon(served, shared_tmp):
    st = served.sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    r = subprocess.run([script("fusesnap"), "--root", str(shared_tmp / "root2"), "serve", "--address",
                        str(served.sock)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"fusesnap: error: another daemon is already serving on {served.sock}"]
    rc, err = served.stop(signal.SIGKILL)
    assert served.sock.exists()              # a killed daemon leaves its socket behind...
    again = Served(shared_tmp)               # ...which the next one replaces
    assert again.client.list() == []
    rc, err = again.stop(signal.SIGINT)
    assert rc == 0 and "SIGINT: stopping" in err and not again.sock.exists()


def test_bad_address_and_root_are_one_line_errors(shared_tmp):
    (shared_tmp / "file").write_text("")
    for args in (["--root", str(shared_tmp / "r"), "serve", "--address", str(shared_tmp / "file")],
                 ["--root", str(shared_tmp / "file" / "r"), "serve", "--address", str(shared_tmp / "s.sock")]):
        r = subprocess.run([script("fusesnap"), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("fusesnap: error: ") and "Traceback" not in r.stderr


@pytest.mark.rootless
def test_rootless_default_socket(shared_tmp, test_user):
    runtime = shared_tmp / "xdg-run"
    run_as(test_user, ["mkdir", "-m", "0700", str(runtime)], check=True)
    env = user_env(test_user, XDG_RUNTIME_DIR=str(runtime), XDG_DATA_HOME=str(shared_tmp / "xdg-data"))
    proc = subprocess.Popen([script("fusesnap"), "serve"], user=test_user.pw_uid, group=test_user.pw_gid,
                            extra_groups=[], env=env, stderr=subprocess.PIPE)
    sock = runtime / "fusesnap" / "fusesnap.sock"
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        st = sock.stat()
        assert st.st_uid == test_user.pw_uid and stat.S_IMODE(st.st_mode) == 0o660
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        store = shared_tmp / "xdg-data" / "fusesnap"
        r = run_as(test_user, [os.fspath(Path(script("fusesnap")).parent / "python"), "-c",
                               "import sys; from fusesnap.daemon.client import RemoteSnapshotter as R; "
                               "c = R(sys.argv[1]); c.wait_ready(30); c.prepare('k'); print(c.stat('k').kind)",
                               str(sock)], env=env, timeout=60)
        assert r.stdout.decode().strip() == "active", r.stderr.decode()
        assert (store / "metadata.db").exists() and stat.S_IMODE(store.stat().st_mode) == 0o700
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0 and not sock.exists()
    env.pop("XDG_RUNTIME_DIR")
    r = run_as(test_user, [script("fusesnap"), "serve"], env=env, timeout=60)
    assert r.returncode == 1 and r.stderr.decode().strip() == \
        "fusesnap: error: XDG_RUNTIME_DIR is not set: pass --address SOCKET"


def test_store_layers_stay_out_of_the_listing(served):
    """containerd's garbage collector removes every listed snapshot it did not make: the store's
    own layer snapshots (named by their chainID) are not listed, but Stat and Prepare find them."""
    from fusesnap.snapshots.snapshotter import Snapshotter

    c = served.client
    c.prepare("w")
    c.commit("named", "w")
    with Snapshotter(served.root) as sn:
        chain = sn.stat("named").chain_id
        assert chain in {i.name for i in sn.list()}          # the in-process view has both
    assert [i.name for i in c.list()] == ["named"]
    assert c.stat(chain).kind == "committed"
    c.view("on-the-layer", chain)
    assert {i.name for i in c.list()} == {"named", "on-the-layer"}


def test_tells_systemd_when_it_serves(shared_tmp):
    """Type=notify (contrib/fusesnap-snapshotter.service): READY=1 once the socket accepts calls."""
    import socket

    notify = shared_tmp / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(notify))
        s.settimeout(60)
        sock = shared_tmp / "s.sock"
        proc = subprocess.Popen([script("fusesnap"), "--root", str(shared_tmp / "root"), "serve", "--address",
                                 str(sock)], env={**os.environ, "NOTIFY_SOCKET": str(notify)},
                                stderr=subprocess.PIPE)
        try:
            assert s.recv(64) == b"READY=1"
            c = RemoteSnapshotter(sock)
            assert c.list() == []           # ready meant ready
            c.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
    assert proc.returncode == 0


def _fuse_daemons(marker: bytes) -> list[tuple[int, list[bytes]]]:
    """(pid, command line) of the processes holding /dev/fuse whose command line has marker."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            if marker in cmd and any(os.readlink(f"/proc/{d}/fd/{fd}") == "/dev/fuse"
                                     for fd in os.listdir(f"/proc/{d}/fd")):
                out.append((int(d), cmd.rstrip(b"\0").split(b"\0")))
        except OSError:
            continue
    return out


def _comm_and_parent(pid: int) -> tuple[str, int]:
    """A process's name and its parent's pid, from /proc/PID/stat."""
    stat_ = Path(f"/proc/{pid}/stat").read_text()
    return stat_[stat_.index("(") + 1:stat_.rindex(")")], int(stat_.rsplit(")", 1)[1].split()[1])


def _parent_comm(pid: int) -> str:
    return _comm_and_parent(_comm_and_parent(pid)[1])[0]


@pytest.mark.parametrize("server", ["mount server", "started processes"])
def test_bind_mode_mounts_with_and_without_a_mount_server(shared_tmp, server):
    """The daemon's own mounts come from the mount server (a fork that shows itself as the
    mount command) or, where none may be used, from mount processes started ahead."""
    env = {"FUSESNAP_MOUNT_SERVER": "0"} if server == "started processes" else {}
    s = Served(shared_tmp, env=env)
    try:
        c = s.client
        c.prepare("w")
        c.commit("base", "w")
        mps = []
        for i in range(3):                 # more than the two processes a pool keeps ready
            mp = shared_tmp / f"mp{i}"
            mp.mkdir()
            perform(c.prepare(f"k{i}", "base"), mp)
            mps.append(mp)
            (mp / "file").write_text(f"k{i}\n")
        source = os.fsencode(c.mounts("k0")[0].source)
        by_server = _fuse_daemons(source)
        started = _fuse_daemons(b"fusesnap.daemon.warmmount\0" + os.fsencode(str(s.root)))
        if server == "mount server":
            # a fork of the mount server, shown as the mount command it runs
            assert len(by_server) == 1 and not started, (by_server, started)
            pid, cmdline = by_server[0]
            assert cmdline[-2:] == [b"k0", source] and b"serve" not in cmdline, cmdline
            assert Path(f"/proc/{pid}/comm").read_text().strip() == "fusesnap"
            assert _parent_comm(pid) == "fusesnap-mountd"
        else:
            assert not by_server and len(started) >= 3, (by_server, started)
            assert all(_parent_comm(pid) != "fusesnap-mountd" for pid, _ in started)
        for i, mp in enumerate(mps):
            assert (mp / "file").read_text() == f"k{i}\n"
            subprocess.run(["umount", str(mp)], check=True)
            c.commit(f"c{i}", f"k{i}")
        assert [i.name for i in c.list("kind==active")] == []
        assert s.stop()[0] == 0
    finally:
        if s.proc.poll() is None:
            s.stop()


@pytest.mark.parametrize("how", ["bind", "bind, started processes", "fuse3"])
def test_an_unpack_snapshot_is_mounted_with_the_writeback_cache(shared_tmp, how):
    """A snapshot containerd extracts a layer into (key `NS/ID/extract-...`) is mounted with the
    kernel's writeback cache, in every way the daemon mounts: a write stays in the kernel
    until close, and is in the upper after it. A container's snapshot sends each write at once."""
    env = {"FUSESNAP_MOUNT_SERVER": "0"} if how == "bind, started processes" else {}
    s = Served(shared_tmp, mounts="fuse3" if how == "fuse3" else "bind", env=env)
    try:
        c = s.client
        for i, (key, cached) in enumerate([("default/7/extract-1234 sha256:" + "a" * 64, True),
                                           ("default/8/container", False)]):
            mounts = c.prepare(key)
            if how == "fuse3":
                assert ("writeback=1" in mounts[0].options) == cached, mounts
                mp = shared_tmp / f"mp{i}"
                mp.mkdir()
                perform(mounts, mp)
            else:
                mp = Path(mounts[0].source)          # the daemon's own mount
            fd = os.open(mp / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                os.write(fd, b"x" * 4096)
                upper, = (s.root / "snapshots").glob(f"*/upper/f{i}")
                assert upper.stat().st_size == (0 if cached else 4096), key
            finally:
                os.close(fd)
            assert upper.read_bytes() == b"x" * 4096
            if how == "fuse3":
                subprocess.run(["umount", str(mp)], check=True)
            c.remove(key)
        assert s.stop()[0] == 0
    finally:
        if s.proc.poll() is None:
            s.stop()


def _fuse_mount_of(mp: str) -> str | None:
    """The fstype of what is mounted at mp, from the mount table (a stat could wait on it)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        if f[4] == mp:
            return f[f.index("-") + 1]
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon mounts FUSE with mount(2) only as root")
def test_bind_mode_mounts_ahead_of_the_daemon_that_serves(shared_tmp):
    """As root the daemon mounts the FUSE connection itself and hands it to a worker of the mount
    server: Prepare returns with the mount in place while the worker is still starting. The first
    mount of a chain (whose lower tree the worker builds, which can fail) waits instead."""
    s = Served(shared_tmp, log=shared_tmp / "serve.log")
    try:
        c = s.client
        c.prepare("w")
        c.commit("base", "w")
        sources = {}
        for key in ("k0", "k1"):
            mounts = c.prepare(key, "base")
            sources[key] = mounts[0].source
            assert _fuse_mount_of(mounts[0].source) == "fuse.fusesnap"    # in place on return
            mp = shared_tmp / key
            mp.mkdir()
            perform(c.mounts(key), mp)
            (mp / "f").write_text(key)
            assert sorted(os.listdir(mp)) == ["f"]
            subprocess.run(["umount", str(mp)], check=True)
        # k1's mount was made ahead and is served by a fork of the mount server showing its mountpoint
        pid, cmdline = _fuse_daemons(os.fsencode(sources["k1"]))[0]
        assert cmdline[-2:] == [b"k1", os.fsencode(sources["k1"])] and _parent_comm(pid) == "fusesnap-mountd"
        c.commit("c1", "k1")
        c.remove("k0")
        rc, log = s.stop()
        assert rc == 0
        ahead = {ln.split("'")[1] for ln in log.splitlines() if "mounted with mount(2)" in ln}
        assert ahead == {"w", "k1"}, log[-3000:]      # (w has no parent: no lower tree to build)
    finally:
        if s.proc.poll() is None:
            s.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon mounts FUSE with mount(2) only as root")
def test_a_mount_made_ahead_whose_worker_dies_is_made_again_at_mounts(shared_tmp):
    """The worker is killed as it takes the connection (FUSESNAP_CRASH_AT, which only the
    worker reaches): the connection is aborted, the daemon logs why, and the next Mounts mounts
    the snapshot again, waiting for it this time, so a container gets a live mount."""
    s = Served(shared_tmp, env={"FUSESNAP_CRASH_AT": "connection-taken"}, log=shared_tmp / "serve.log")
    try:
        c = s.client
        c.prepare("w")
        c.commit("base", "w")
        c.prepare("k0", "base")           # the chain's first mount waits (and so builds its tree)
        source = c.prepare("k1", "base")[0].source
        deadline = time.monotonic() + 30
        while True:                       # the worker dies: requests then fail instead of waiting
            try:
                os.statvfs(source)
            except OSError as e:
                assert e.errno == errno.ENOTCONN
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        mp = shared_tmp / "mp"
        mp.mkdir()
        perform(c.mounts("k1"), mp)
        (mp / "f").write_text("alive")
        assert (mp / "f").read_text() == "alive"
        subprocess.run(["umount", str(mp)], check=True)
        c.remove("k1")
        c.remove("k0")
        rc, log = s.stop()
        assert rc == 0
        assert "mounting snapshot 'k1':" in log and "its next Mounts mounts it again" in log, log[-3000:]
    finally:
        if s.proc.poll() is None:
            s.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon mounts FUSE with mount(2) only as root")
def test_a_mount_made_ahead_over_a_damaged_tree_cache_rebuilds_it(shared_tmp):
    """The daemon plans a mount made ahead (its worker does not open the store) from the chain's
    cached lower tree; a cache file that turns out damaged when the worker reads it sends the
    worker to the store, which rebuilds it: the mount serves the image all the same."""
    s = Served(shared_tmp, log=shared_tmp / "serve.log")
    try:
        c = s.client
        src = Path(c.prepare("w")[0].source)
        (src / "etc").mkdir()
        (src / "etc" / "group").write_text("root:x:0:\n")
        c.commit("base", "w")
        c.prepare("k0", "base")           # builds the chain's lower tree cache
        caches = list((s.root / "cache" / "lowertrees").iterdir())
        assert len(caches) == 1
        caches[0].write_bytes(b"not a lower tree")
        mounts = c.prepare("k1", "base")
        mp = shared_tmp / "mp"
        mp.mkdir()
        perform(c.mounts("k1"), mp)
        assert (mp / "etc" / "group").read_text() == "root:x:0:\n"
        (mp / "f").write_text("k1")
        subprocess.run(["umount", str(mp)], check=True)
        assert (Path(mounts[0].source) / "f").read_text() == "k1"
        assert caches[0].read_bytes() != b"not a lower tree"      # rebuilt
        c.remove("k1")
        c.remove("k0")
        rc, log = s.stop()
        assert rc == 0
        assert "snapshot 'k1' mounted with mount(2)" in log and "mounting snapshot 'k1':" not in log, log[-3000:]
    finally:
        if s.proc.poll() is None:
            s.stop()


def _standbys(root: Path) -> list[int]:
    """Pids of the standby workers a daemon of store root keeps (their command line says so)."""
    want = [b"--root", os.fsencode(root), b"mount", b"(standby)"]
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            except OSError:
                continue
            if cmd[-4:] == want:
                out.append(int(d))
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon mounts FUSE with mount(2) only as root")
def test_a_standby_worker_serves_the_next_mount_and_goes_with_the_daemon(shared_tmp):
    """The daemon keeps one mount-server worker started ahead; a mount made ahead is handed to it
    (plan and connection over its open socket) and a new one is started after. One that died
    while waiting only sends the next mount the ordinary way. None outlives the daemon."""
    s = Served(shared_tmp, log=shared_tmp / "serve.log")
    try:
        c = s.client
        src = Path(c.prepare("w")[0].source)
        (src / "f").write_text("base")
        c.commit("base", "w")
        c.prepare("k0", "base")           # the chain's first mount waits (and builds its tree)
        first, = wait_for(lambda: _standbys(s.root), 30, "a standby")
        mp = shared_tmp / "mp"
        mp.mkdir()
        for key in ("k1", "k2"):
            c.prepare(key, "base")
            perform(c.mounts(key), mp)
            assert (mp / "f").read_text() == "base"
            (mp / "f").write_text(key)
            subprocess.run(["umount", str(mp)], check=True)
            if key == "k1":
                assert first not in _standbys(s.root)     # it serves k1 now
                again, = wait_for(lambda: _standbys(s.root), 30, "the next standby")
                os.kill(again, signal.SIGKILL)
                wait_for(lambda: not _standbys(s.root), 30, "the killed standby to go")
        assert wait_for(lambda: _standbys(s.root), 30, "a standby after the fallback")
        rc, log = s.stop()
        assert rc == 0
        assert "snapshot 'k1' mounted with mount(2); its standby worker serves it" in log, log[-3000:]
        assert "snapshot 'k2' mounted with mount(2); a worker of the mount server starts" in log, log[-3000:]
        assert "mounting snapshot" not in log, log[-3000:]      # no worker failed
        wait_for(lambda: not _standbys(s.root), 10, "the standby to go with its daemon")
    finally:
        if s.proc.poll() is None:
            s.stop()


def _in_namespace(ns: str) -> list[tuple[int, str, int]]:
    """(pid, comm, parent pid) of the processes in mount namespace ns."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.readlink(f"/proc/{d}/ns/mnt") == ns:
                    out.append((int(d), *_comm_and_parent(int(d))))
            except (OSError, ValueError):
                continue
    return out


def test_the_daemon_keeps_its_mount_server_from_going_idle(shared_tmp):
    """A mount server goes after its idle time; the daemon's requests are seconds or hours
    apart, so it keeps its server alive while it runs, and lets it go when it stops."""
    root, sock = shared_tmp / "root", shared_tmp / "run" / "fusesnap.sock"
    # its own mount namespace: a server of its own context, none shared with other tests
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", script("fusesnap"), "--root", str(root),
                             "serve", "--address", str(sock)], stderr=subprocess.PIPE,
                            env={**os.environ, "FUSESNAP_MOUNT_SERVER_IDLE": "2"})
    ns = None
    try:
        c = RemoteSnapshotter(sock)
        c.wait_ready(30)
        ns = os.readlink(f"/proc/{proc.pid}/ns/mnt")

        def servers() -> set[int]:
            procs = _in_namespace(ns)
            mountd = {pid for pid, comm, _ in procs if comm == "fusesnap-mountd"}
            return {pid for pid, comm, ppid in procs if pid in mountd and ppid not in mountd}

        c.prepare("a")                                     # mounted by a fork of the server
        first = servers()
        assert len(first) == 1, _in_namespace(ns)
        time.sleep(6)                                      # three idle times
        assert servers() == first
        c.prepare("b")
        assert servers() == first
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 30
        while servers() and time.monotonic() < deadline:  # kept alive no more: it goes
            time.sleep(0.2)
        assert not servers()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if ns is not None:        # the mount daemons live on in that namespace: end them
            for pid, _, _ in _in_namespace(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
