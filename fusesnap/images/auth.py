"""Registry credentials and challenges: --creds, containers' auth.json, docker's config.json.

Lookup order (containers/image's): `--creds USER:PASS`, `--authfile FILE`,
$REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json,
$XDG_CONFIG_HOME/containers/auth.json, ~/.docker/config.json. Keys may name
a registry (`host:port`, with or without `https://`) or a repository inside it
(`host/ns/repo`); the longest matching key wins. Credential helpers are not run.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInput

log = logging.getLogger("fusesnap.images")

DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io", "https://index.docker.io/v1/")


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    @classmethod
    def parse(cls, text: str) -> "Credentials":
        user, sep, password = text.partition(":")
        if not user or not sep:
            raise InvalidInput("bad --creds: expected USER:PASSWORD")
        return cls(user, password)


def auth_files(authfile: str | None = None) -> list[Path]:
    if authfile:
        return [Path(authfile)]
    out = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        out.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        out.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    out.append(config / "containers" / "auth.json")
    docker_config = os.environ.get("DOCKER_CONFIG")
    out.append(Path(docker_config) / "config.json" if docker_config else Path.home() / ".docker" / "config.json")
    return out


def _normalize(key: str) -> str:
    key = re.sub(r"^[a-z]+://", "", key).rstrip("/")
    if key.endswith("/v1") or key.endswith("/v2"):
        key = key[:-3]
    return "docker.io" if key in ("index.docker.io", "registry-1.docker.io") else key


def _decode(entry: object, where: Path, key: str) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise InvalidInput(f"{where}: the auth entry for {key!r} is not base64 of USER:PASSWORD") from None
        if sep:
            return Credentials(user, password)
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"])
    return None


def find_credentials(registry: str, repository: str, creds: str | None = None,
                     authfile: str | None = None) -> Credentials | None:
    """The credentials to use for registry/repository, or None for anonymous access."""
    if creds:
        return Credentials.parse(creds)
    want = f"{registry}/{repository}"
    for path in auth_files(authfile):
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            if authfile:
                raise InvalidInput(f"auth file {path} does not exist") from None
            continue
        except (OSError, ValueError) as e:
            raise InvalidInput(f"cannot read the auth file {path}: {e}") from None
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict):
            continue
        best: tuple[int, Credentials] | None = None
        for key, entry in auths.items():
            k = _normalize(key)
            if k == registry or want == k or want.startswith(k + "/"):
                c = _decode(entry, path, key)
                if c and (best is None or len(k) > best[0]):
                    best = (len(k), c)
        if best:
            log.info("credentials for %s from %s", registry, path)
            return best[1]
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'([A-Za-z]+)="([^"]*)"', rest)}
    return scheme.lower(), params
