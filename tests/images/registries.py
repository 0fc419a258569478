"""Real docker-registry instances on 127.0.0.1 for the images tier (plain, htpasswd, token auth
over TLS with a token service of our own), and skopeo helpers."""

from __future__ import annotations

import base64
import datetime
import http.server
import ipaddress
import json
import re
import secrets
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from registry import Registry, free_port, need, start_registry  # noqa: F401 (the tier's fixtures use them)

USER, PASSWORD = "alice", "s3cret-pw"


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


def skopeo_copy(src: str, dst: str, *extra: str) -> None:
    p = subprocess.run(["skopeo", "copy", "-q", *extra, src, dst], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def skopeo_inspect(ref: str, *extra: str, raw: bool = False, config: bool = False) -> dict:
    args = ["skopeo", "inspect", *extra] + (["--raw"] if raw else []) + (["--config"] if config else []) + [ref]
    p = subprocess.run(args, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


class FaultProxy:
    """A plain-HTTP proxy in front of a registry that breaks the answers a test chooses.

    rules: (regex on the request path, action) where action is ("status", CODE),
    ("truncate", BYTES) (the body stops early and the connection closes), ("corrupt", [AT])
    (the byte at AT, by default the last, flipped) or ("slow", BYTES_PER_SECOND)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.rules: list[tuple[str, tuple]] = []
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log: list[str] = []
        client = httpx.Client(timeout=30)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _handle(self):
                proxy.log.append(f"{self.command} {self.path} {self.headers.get('Range', '')}".strip())
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                rule = next((a for rx, a in proxy.rules if re.search(rx, self.path)), None)
                if rule and rule[0] == "status":
                    data = json.dumps({"errors": [{"code": "INJECTED", "message": f"injected {rule[1]}"}]}).encode()
                    self.send_response(rule[1])
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = client.request(self.command, f"http://{proxy.upstream}{self.path}", headers=headers,
                                   content=body)
                data = r.content
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                if rule and rule[0] == "truncate":
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command == "HEAD":
                    return
                if rule and rule[0] == "truncate":
                    self.wfile.write(data[:rule[1]])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if rule and rule[0] == "corrupt" and data:
                    at = (rule[1] if len(rule) > 1 else -1) % len(data)
                    data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
                if rule and rule[0] == "slow":
                    step = max(1, rule[1] // 20)
                    for i in range(0, len(data), step):
                        self.wfile.write(data[i:i + step])
                        self.wfile.flush()
                        time.sleep(0.05)
                    return
                self.wfile.write(data)

            def handle_one_request(self):
                try:
                    super().handle_one_request()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client went away (a test killed it)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ref(self, repo: str, tag: str = "latest") -> str:
        return f"docker://{self.host}/{repo}:{tag}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
