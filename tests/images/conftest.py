"""Fixtures of the images tier: real docker-registry instances on 127.0.0.1 (plain, htpasswd,
token auth over TLS with a token service of our own), a fault-injecting proxy, skopeo."""

from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import bcrypt
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

HERE = Path(__file__).resolve().parent
USER, PASSWORD = "alice", "s3cret-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (scripts/setup installs it)")
    return path


@dataclass
class Registry:
    host: str                       # 127.0.0.1:PORT
    log: Path
    scheme: str = "http"
    proc: subprocess.Popen | None = None
    extra: dict = field(default_factory=dict)

    def ref(self, repo: str, tag: str = "latest") -> str:
        return f"docker://{self.host}/{repo}:{tag}"

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def requests(self, method: str, pattern: str) -> list[str]:
        """Access-log lines of `method` requests whose path matches `pattern` (a regex)."""
        rx = re.compile(rf'"{method} ({pattern})[^"]* HTTP/[0-9.]+" (\d+)')
        return [line for line in self.log_lines() if rx.search(line)]


def start_registry(tmp: Path, auth: dict | None = None, tls: tuple[Path, Path] | None = None) -> Registry:
    need("docker-registry")
    port = free_port()
    cfg = tmp / "registry.yml"
    text = (HERE / "registry.yml").read_text()
    if auth:
        text += "auth:\n" + "".join(f"  {k}:\n" + "".join(f"    {kk}: {vv}\n" for kk, vv in v.items())
                                    for k, v in auth.items())
    cfg.write_text(text)
    (tmp / "data").mkdir()
    env = dict(os.environ, REGISTRY_HTTP_ADDR=f"127.0.0.1:{port}",
               REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY=str(tmp / "data"))
    if tls:
        env.update(REGISTRY_HTTP_TLS_CERTIFICATE=str(tls[0]), REGISTRY_HTTP_TLS_KEY=str(tls[1]))
    log = tmp / "registry.log"
    proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, env=env)
    scheme = "https" if tls else "http"
    deadline = time.monotonic() + 20
    while True:
        try:
            r = httpx.get(f"{scheme}://127.0.0.1:{port}/v2/", verify=False, timeout=2)
            if r.status_code in (200, 401):
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"docker-registry did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return Registry(f"127.0.0.1:{port}", log, scheme, proc)


def stop(reg: Registry) -> None:
    if reg.proc is not None:
        reg.proc.terminate()
        try:
            reg.proc.wait(10)
        except subprocess.TimeoutExpired:
            reg.proc.kill()
            reg.proc.wait()


def self_signed(tmp: Path) -> tuple[Path, Path, rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    crt, pem = tmp / "cert.pem", tmp / "key.pem"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption()))
    return crt, pem, key, cert


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class TokenService:
    """The bearer-token service a registry's `auth: token:` points at: checks Basic credentials
    (anonymous gets no token) and signs a JWT (RS256, x5c) granting the scopes asked for."""

    def __init__(self, key: rsa.RSAPrivateKey, cert: x509.Certificate, service: str, issuer: str) -> None:
        self.key, self.cert, self.service, self.issuer = key, cert, service, issuer
        self.port = free_port()
        self.requests = 0
        svc = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                svc.requests += 1
                q = parse_qs(urlparse(self.path).query)
                auth = self.headers.get("Authorization", "")
                ok = auth == "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if not ok:
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"token": svc.token(q.get("scope", []))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, scopes: list[str]) -> str:
        access = []
        for s in scopes:
            for one in s.split(" "):
                typ, _, rest = one.partition(":")
                name, _, actions = rest.rpartition(":")
                access.append({"type": typ, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256",
                  "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": self.issuer, "sub": USER, "aud": self.service, "exp": now + 600, "nbf": now - 10,
                  "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
        sig = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing + "." + _b64(sig)

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """A plain-HTTP registry without auth, shared by the tier (tests use their own repositories)."""
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    stop(reg)


@pytest.fixture(scope="session")
def htpasswd_registry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry-htpasswd")
    pw = tmp / "htpasswd"
    pw.write_text(f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()}\n")
    reg = start_registry(tmp, auth={"htpasswd": {"realm": "fusesnap-test", "path": str(pw)}})
    yield reg
    stop(reg)


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
    stop(reg)


@pytest.fixture(scope="session")
def skopeo():
    return need("skopeo")


def skopeo_copy(src: str, dst: str, *extra: str) -> None:
    p = subprocess.run(["skopeo", "copy", "-q", *extra, src, dst], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def skopeo_inspect(ref: str, *extra: str, raw: bool = False, config: bool = False) -> dict:
    args = ["skopeo", "inspect", *extra] + (["--raw"] if raw else []) + (["--config"] if config else []) + [ref]
    p = subprocess.run(args, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)
