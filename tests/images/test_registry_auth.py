"""Registry authentication against real docker-registry instances: htpasswd (Basic) and bearer
tokens over HTTPS; credentials from --creds, auth.json and ~/.docker/config.json."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from registries import PASSWORD, USER, skopeo_copy
from imagebuild import layer_tars, write_layout
from storeutil import fusesnap, store_state

pytestmark = pytest.mark.usefixtures("skopeo")


def push_test_image(reg, layout: Path, repo: str, tls: str = "--dest-tls-verify=false") -> None:
    write_layout(layout, layer_tars("-" + repo.replace("/", "-")))
    skopeo_copy(f"oci:{layout}:latest", reg.ref(repo), tls, f"--dest-creds={USER}:{PASSWORD}")


def empty_store(shared_tmp: Path) -> tuple[Path, tuple]:
    root = shared_tmp / "root"
    fusesnap(root, "layers")
    return root, store_state(root)


def one_line_failure(p, *words: str) -> str:
    err = p.stderr.decode()
    assert p.returncode != 0 and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_htpasswd_basic_auth(htpasswd_registry, shared_tmp):
    reg = htpasswd_registry
    push_test_image(reg, shared_tmp / "layout", "basic/img")
    root, before = empty_store(shared_tmp)
    one_line_failure(fusesnap(root, "pull", "--plain-http", reg.ref("basic/img")), "authentication")
    one_line_failure(fusesnap(root, "pull", "--plain-http", "--creds", f"{USER}:wrong", reg.ref("basic/img")),
                     "401", USER)
    assert store_state(root) == before
    p = fusesnap(root, "pull", "--plain-http", "--creds", f"{USER}:{PASSWORD}", reg.ref("basic/img"))
    assert p.returncode == 0, p.stderr.decode()
    # push with the credentials from a containers auth.json (REGISTRY_AUTH_FILE)
    auth = shared_tmp / "auth.json"
    auth.write_text(json.dumps({"auths": {reg.host: {"auth": base64.b64encode(f"{USER}:{PASSWORD}".encode())
                                                     .decode()}}}))
    env = {"REGISTRY_AUTH_FILE": str(auth), "PATH": "/usr/bin:/bin"}
    p = fusesnap(root, "push", "--plain-http", f"{reg.host}/basic/img:latest", reg.ref("basic/copy"),
                 env={**os.environ, **env})
    assert p.returncode == 0, p.stderr.decode()


def test_bearer_token_over_tls(token_registry, shared_tmp):
    reg = token_registry
    push_test_image(reg, shared_tmp / "layout", "tok/img")
    root, before = empty_store(shared_tmp)
    # the certificate is self-signed: verification fails with one line, --tls-verify=false passes
    one_line_failure(fusesnap(root, "pull", "--creds", f"{USER}:{PASSWORD}", reg.ref("tok/img")), "certificate")
    one_line_failure(fusesnap(root, "pull", "--tls-verify=false", reg.ref("tok/img")), "token service")
    one_line_failure(fusesnap(root, "pull", "--tls-verify=false", "--creds", f"{USER}:nope", reg.ref("tok/img")),
                     "token service", "401")
    assert store_state(root) == before
    # credentials from ~/.docker/config.json
    home = shared_tmp / "home"
    (home / ".docker").mkdir(parents=True)
    (home / ".docker" / "config.json").write_text(json.dumps({"auths": {f"https://{reg.host}": {
        "auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}}}))
    env = {k: v for k, v in os.environ.items() if k not in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR",
                                                             "XDG_CONFIG_HOME", "DOCKER_CONFIG")}
    env["HOME"] = str(home)
    served = reg.extra["token_service"].requests
    p = fusesnap(root, "pull", "--tls-verify=false", reg.ref("tok/img"), "--json", env=env)
    assert p.returncode == 0, p.stderr.decode()
    assert reg.extra["token_service"].requests > served
    p = fusesnap(root, "push", "--tls-verify=false", f"{reg.host}/tok/img:latest", reg.ref("tok/pushed"), env=env)
    assert p.returncode == 0, p.stderr.decode()
    # the blobs came by cross-repository mount, under a token for both repositories
    mounts = reg.requests("POST", r"/v2/tok/pushed/blobs/uploads/\?mount=")
    status = [line.split('" ')[1].split()[0] for line in mounts]
    assert status.count("201") == 3 and set(status) <= {"201", "401"}   # 401: asked for the wider token
    assert fusesnap(root, "fsck").returncode == 0
