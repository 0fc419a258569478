"""Broken images and answers: one line on stderr, non-zero exit, the store as it was (fsck clean,
no new layer, no record); an interrupted pull (kill -9) resumes."""

from __future__ import annotations

import gzip
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import script
from imagebuild import config_json, layer_tars, sha, write_layout
from registries import FaultProxy, skopeo_copy
from storeutil import fusesnap, store_state


def assert_refused(root: Path, args: list[str], *words: str) -> str:
    fusesnap(root, "layers")  # the store exists, so that "unchanged" means something
    before = store_state(root)
    p = fusesnap(root, *args)
    err = p.stderr.decode()
    assert p.returncode != 0, err
    assert err.count("\n") == 1 and err.startswith("fusesnap: error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    assert store_state(root) == before
    assert fusesnap(root, "fsck").returncode == 0
    assert json.loads(fusesnap(root, "images", "--json").stdout) == []
    return err


@pytest.fixture
def layout(shared_tmp):
    return write_layout(shared_tmp / "layout", layer_tars("-broken"))


def blob(img, i: int) -> Path:
    return img.layout / "blobs/sha256" / img.layer_digests[i][7:]


def test_blob_digest_mismatch(layout, shared_tmp):
    p = blob(layout, 2)
    good = p.read_bytes()
    data = bytearray(good)
    data[4] ^= 0xFF  # the gzip header's mtime: decompresses as before, but another digest
    p.write_bytes(bytes(data))
    assert_refused(shared_tmp / "root", ["pull", f"oci:{layout.layout}"], layout.layer_digests[2], "does not match")
    for at in (len(good) // 2, len(good) - 1):  # inside the deflate stream, in the trailer
        data = bytearray(good)
        data[at] ^= 0xFF  # the decompressor trips over it, but the digest is the cause to report
        p.write_bytes(bytes(data))
        assert_refused(shared_tmp / "root", ["pull", f"oci:{layout.layout}"], layout.layer_digests[2],
                       "does not match")


def test_damaged_blob_with_its_own_digest(shared_tmp):
    tars = layer_tars("-honest")
    damaged = bytearray(gzip.compress(tars[2]))
    damaged[len(damaged) // 2] ^= 0xFF
    img = write_layout(shared_tmp / "layout", tars, blobs_override={2: bytes(damaged)})
    assert_refused(shared_tmp / "root", ["pull", f"oci:{img.layout}"], img.layer_digests[2], "corrupt gzip")


def test_truncated_blob(layout, shared_tmp):
    p = blob(layout, 2)
    p.write_bytes(p.read_bytes()[:1000])
    assert_refused(shared_tmp / "root", ["pull", f"oci:{layout.layout}"], "truncated")


def test_manifest_names_a_missing_blob(layout, shared_tmp):
    blob(layout, 1).unlink()
    assert_refused(shared_tmp / "root", ["pull", f"oci:{layout.layout}"], layout.layer_digests[1][7:], "missing")


def test_config_diff_ids_disagree(shared_tmp):
    tars = layer_tars("-cfg")
    ids = [sha(t) for t in tars]
    img = write_layout(shared_tmp / "layout", tars, config=config_json([ids[0], ids[2], ids[1]]))
    assert_refused(shared_tmp / "root", ["pull", f"oci:{img.layout}"], "diff_id", ids[2])
    img = write_layout(shared_tmp / "layout2", tars, config=config_json(ids[:2]))
    assert_refused(shared_tmp / "root", ["pull", f"oci:{img.layout}"], "2 diff_ids", "3 layers")


def test_corrupt_archives(layout, shared_tmp):
    junk = shared_tmp / "junk.tar"
    junk.write_bytes(os.urandom(5000))
    root = shared_tmp / "root"
    assert_refused(root, ["pull", f"oci-archive:{junk}"], "corrupt archive")
    assert_refused(root, ["pull", f"docker-archive:{junk}"], "corrupt archive")
    arch = shared_tmp / "img.tar"
    skopeo_copy(f"oci:{layout.layout}:latest", f"oci-archive:{arch}")
    cut = shared_tmp / "cut.tar"
    cut.write_bytes(arch.read_bytes()[: arch.stat().st_size // 2])
    assert_refused(root, ["pull", f"oci-archive:{cut}"])
    assert_refused(root, ["pull", f"docker-archive:{arch}"], "oci-archive:")
    assert_refused(root, ["pull", f"oci:{shared_tmp / 'nowhere'}"], "nowhere")
    assert_refused(root, ["pull", "ftp://x"], "bad image reference")


def test_import_refuses_image_archives(layout, shared_tmp):
    root = shared_tmp / "root"
    for kind in ("docker-archive", "oci-archive"):
        arch = shared_tmp / f"{kind}.tar"
        skopeo_copy(f"oci:{layout.layout}:latest", f"{kind}:{arch}" + (":x/y:z" if kind == "docker-archive" else ""))
        assert_refused(root, ["import", str(arch)], f"fusesnap pull {kind}:{arch}", "--raw")
        p = fusesnap(root, "import", "-", input=arch.read_bytes())
        assert p.returncode != 0 and f"pull {kind}:stdin" in p.stderr.decode()
        p = fusesnap(root, "import", "--raw", str(arch))
        assert p.returncode == 0, p.stderr.decode()
    assert_refused(root, ["import", str(layout.layout)], f"fusesnap pull oci:{layout.layout}")
    # a plain layer (and one from stdin) still imports
    for args, data in ((["import", "-"], layer_tars()[1]), (["import", "-"], layer_tars()[0])):
        p = fusesnap(root, *args, input=data)
        assert p.returncode == 0, p.stderr.decode()


@pytest.fixture
def proxied(registry, shared_tmp):
    write_layout(shared_tmp / "layout", layer_tars("-proxy"))
    img_repo = f"broken/r{secrets.token_hex(4)}"
    skopeo_copy(f"oci:{shared_tmp / 'layout'}:latest", registry.ref(img_repo), "--dest-tls-verify=false")
    proxy = FaultProxy(registry.host)
    yield proxy, img_repo
    proxy.close()


@pytest.mark.parametrize("rule,words", [
    (("status", 404), ["404", "not found"]),
    (("status", 401), ["401"]),
    (("status", 500), ["500"]),
    (("corrupt",), ["does not match"]),
    (("corrupt", 1000), ["does not match"]),
    (("truncate", 4000), ["failed"]),
])
def test_broken_registry_answers(proxied, shared_tmp, rule, words):
    proxy, repo = proxied
    manifest = manifest_of(proxy, repo)
    big = manifest["layers"][0]["digest"]
    proxy.rules = [(f"/blobs/{big}", rule)]
    assert_refused(shared_tmp / "root", ["pull", "--plain-http", "--retries", "1", proxy.ref(repo)], *words)
    if rule[0] == "status" and rule[1] == 500:
        assert sum(1 for line in proxy.log if big in line and line.startswith("GET")) == 2  # retried once


def test_manifest_answers(proxied, shared_tmp):
    proxy, repo = proxied
    proxy.rules = [("/manifests/", ("status", 404))]
    assert_refused(shared_tmp / "root", ["pull", "--plain-http", proxy.ref(repo)], "manifest latest", "404")
    proxy.rules = [("/manifests/", ("status", 503))]
    assert_refused(shared_tmp / "root", ["pull", "--plain-http", "--retries", "0", proxy.ref(repo)], "503")


def test_interrupted_pull_resumes(proxied, shared_tmp):
    proxy, repo = proxied
    manifest = manifest_of(proxy, repo)
    big = manifest["layers"][0]
    proxy.rules = [(f"/blobs/{big['digest']}", ("slow", 200_000))]
    root = shared_tmp / "root"
    fusesnap(root, "layers")
    before = store_state(root)
    partial = root / "images" / "downloads" / f"{big['digest'][7:]}.partial"
    proc = subprocess.Popen([script("fusesnap"), "--root", str(root), "pull", "--plain-http", proxy.ref(repo)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (partial.exists() and partial.stat().st_size > 100_000):
        assert time.monotonic() < deadline and proc.poll() is None, "the download did not start"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)   # inside the download and the import that follows it
    proc.wait()
    assert store_state(root)[0] == before[0]           # no layer, record or retain appeared
    have = partial.stat().st_size
    proxy.rules = []
    p = fusesnap(root, "pull", "--plain-http", proxy.ref(repo), "--json")
    assert p.returncode == 0, p.stderr.decode()
    res = json.loads(p.stdout)
    total = sum(layer["size"] for layer in manifest["layers"])
    assert res["transferred"] == total                  # counted from the resumed offset...
    assert any(line.startswith(f"GET /v2/{repo}/blobs/{big['digest']} bytes={have}-") for line in proxy.log)
    assert not partial.exists() and fusesnap(root, "fsck").returncode == 0
    assert os.listdir(root / "staging") == []           # the killed import's leftovers are gone


def test_killed_import_resumes(registry, shared_tmp):
    """kill -9 inside a layer import (after staging): nothing half-imported; the next pull finishes."""
    img = write_layout(shared_tmp / "layout", layer_tars("-crash"))
    root = shared_tmp / "root"
    p = fusesnap(root, "pull", f"oci:{img.layout}", env={**os.environ, "FUSESNAP_CRASH_AT": "staged"})
    assert p.returncode == -signal.SIGKILL
    assert fusesnap(root, "layers", "--json").stdout.strip() == b"[]"
    p = fusesnap(root, "pull", f"oci:{img.layout}", "--json")
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout)["top_chain"] and fusesnap(root, "fsck").returncode == 0
    assert os.listdir(root / "staging") == []


def manifest_of(proxy: FaultProxy, repo: str) -> dict:
    return json.loads(subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                      f"docker://{proxy.upstream}/{repo}:latest"],
                                     capture_output=True, text=True, check=True).stdout)


def pull_stuck_on_last_layer(proxy: FaultProxy, repo: str, root: Path, rate: int) -> subprocess.Popen:
    """A pull whose last layer trickles in; returned once the layers below it are in the store."""
    last = manifest_of(proxy, repo)["layers"][-1]["digest"]
    proxy.rules = [(f"/blobs/{last}", ("slow", rate))]
    proc = subprocess.Popen([script("fusesnap"), "--root", str(root), "pull", "--plain-http", proxy.ref(repo)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while len(json.loads(fusesnap(root, "layers", "--json").stdout or b"[]")) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, "the first layers did not arrive"
        time.sleep(0.05)
    return proc


def test_gc_during_a_pull_keeps_its_layers(proxied, shared_tmp):
    proxy, repo = proxied
    root = shared_tmp / "root"
    proc = pull_stuck_on_last_layer(proxy, repo, root, 100_000)
    gc = fusesnap(root, "gc", "--json")
    assert gc.returncode == 0 and json.loads(gc.stdout)["removed"] == []   # retained by the pull
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert len(json.loads(fusesnap(root, "layers", "--json").stdout)) == 3
    assert json.loads(fusesnap(root, "gc", "--json").stdout)["removed"] == []  # now the record's


def test_failed_pull_over_present_layers_leaves_no_retain(shared_tmp):
    """Layers a failing pull found present (or re-imported) keep no retain of it afterwards."""
    tars = layer_tars("-present")
    good = write_layout(shared_tmp / "good", tars)
    root = shared_tmp / "root"
    assert fusesnap(root, "pull", f"oci:{good.layout}").returncode == 0
    before = store_state(root)
    other = layer_tars("-other")
    bad = write_layout(shared_tmp / "bad", [tars[0], tars[1], other[2]],
                       config=config_json([sha(tars[0]), sha(tars[1]), sha(tars[2])]))
    p = fusesnap(root, "pull", f"oci:{bad.layout}", "--name", "bad")
    assert p.returncode != 0 and b"diff_id" in p.stderr
    assert store_state(root) == before and fusesnap(root, "fsck").returncode == 0


def test_killed_pull_retains_are_released_by_the_next_pull(proxied, shared_tmp):
    proxy, repo = proxied
    root = shared_tmp / "root"
    proc = pull_stuck_on_last_layer(proxy, repo, root, 50_000)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(fusesnap(root, "gc", "--json").stdout)["removed"] == []   # still retained
    other = write_layout(shared_tmp / "other", layer_tars("-other-image"))
    assert fusesnap(root, "pull", f"oci:{other.layout}").returncode == 0      # releases the dead pull's
    removed = json.loads(fusesnap(root, "gc", "--json").stdout)["removed"]
    assert len(removed) == 2 and fusesnap(root, "fsck").returncode == 0
