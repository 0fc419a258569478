"""Real docker-registry instances on 127.0.0.1 for the tests (images tier, containerd clients)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent


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

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def requests(self, method: str, pattern: str) -> list[str]:
        """Access-log lines of `method` requests whose path matches `pattern` (a regex)."""
        rx = re.compile(rf'"{method} ({pattern})[^"]* HTTP/[0-9.]+" (\d+)')
        return [line for line in self.log_lines() if rx.search(line)]


def start_registry(tmp: Path, auth: dict | None = None, tls: tuple[Path, Path] | None = None) -> Registry:
    """A docker-registry on 127.0.0.1 (a free port), storing in tmp; auth: the config's
    auth section (htpasswd, token); tls: (certificate, key)."""
    need("docker-registry")
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
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
