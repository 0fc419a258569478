"""Fixtures of the images tier: registries (see registries.py) and skopeo."""

from __future__ import annotations

import bcrypt
import pytest

from registries import PASSWORD, USER, TokenService, need, self_signed, start_registry


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """A plain-HTTP registry without auth, shared by the tier (tests use their own repositories)."""
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def htpasswd_registry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry-htpasswd")
    pw = tmp / "htpasswd"
    pw.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()}\n")
    reg = start_registry(tmp, auth={"htpasswd": {"realm": "fusesnap-test", "path": str(pw)}})
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory):
    """HTTPS (self-signed certificate) with bearer tokens from TokenService."""
    tmp = tmp_path_factory.mktemp("registry-token")
    crt, pem, key, cert = self_signed(tmp)
    svc = TokenService(key, cert, "fusesnap-registry", "fusesnap-token-issuer")
    reg = start_registry(tmp, tls=(crt, pem), auth={"token": {
        "realm": f"http://127.0.0.1:{svc.port}/token", "service": "fusesnap-registry",
        "issuer": "fusesnap-token-issuer", "rootcertbundle": str(crt)}})
    reg.extra.update(token_service=svc, cert=crt)
    yield reg
    svc.close()
    reg.stop()


@pytest.fixture(scope="session")
def skopeo():
    return need("skopeo")


