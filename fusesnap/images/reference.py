"""Image references with their transport: oci:, oci-archive:, docker-archive:, docker://.

The spelling follows containers/image (skopeo, podman): `oci:DIR[:TAG]`,
`oci-archive:FILE[:TAG]`, `docker-archive:FILE[:NAME[:TAG]]`,
`docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`. A registry name without a dot, a
colon or `localhost` in its first component is Docker Hub's, as docker
normalizes it (`busybox` -> `docker.io/library/busybox:latest`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..digest import is_digest
from ..errors import InvalidInput

TRANSPORTS = ("oci", "oci-archive", "docker-archive", "docker")
DOCKER_HUB = "docker.io"
DEFAULT_TAG = "latest"

# distribution/reference's grammar, lower-case path components, tag of <= 128 characters
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                      r"|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?$")


@dataclass(frozen=True)
class ImageRef:
    """Where an image is: a transport and its address (path or registry/repository)."""

    transport: str
    path: str = ""              # oci, oci-archive, docker-archive
    tag: str | None = None      # oci/oci-archive tag, docker tag, docker-archive NAME:TAG
    registry: str = ""          # docker: host[:port]
    repository: str = ""        # docker: path in the registry
    digest: str | None = None   # docker: @sha256:...

    @property
    def is_registry(self) -> bool:
        return self.transport == "docker"

    @property
    def reference(self) -> str:
        """What the registry's manifest endpoint takes: the digest if given, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def name(self) -> str:
        """The default image record name: `host/repo:tag` for a registry, the full string otherwise."""
        if self.is_registry:
            at = f"@{self.digest}" if self.digest else f":{self.tag or DEFAULT_TAG}"
            return f"{self.registry}/{self.repository}{at}"
        return str(self)

    def __str__(self) -> str:
        if self.is_registry:
            return "docker://" + self.name()
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")


def parse_ref(text: str) -> ImageRef:
    """Parse TRANSPORT:ADDRESS; a one-line InvalidInput names what is wrong."""
    transport, sep, rest = text.partition(":")
    if not sep or transport not in TRANSPORTS:
        raise InvalidInput(f"bad image reference {text!r}: expected oci:DIR[:TAG], oci-archive:FILE[:TAG], "
                           "docker-archive:FILE or docker://HOST/REPO[:TAG]")
    if transport == "docker":
        if not rest.startswith("//"):
            raise InvalidInput(f"bad image reference {text!r}: expected docker://HOST/REPO[:TAG|@DIGEST]")
        return parse_docker(rest[2:])
    path, _, tag = rest.partition(":")
    if not path:
        raise InvalidInput(f"bad image reference {text!r}: no path after {transport}:")
    if transport == "docker-archive":
        if tag:
            parse_docker(tag)  # NAME[:TAG] must be a valid docker name
        return ImageRef(transport, path=path, tag=tag or None)
    if tag and not _TAG_RE.match(tag):
        raise InvalidInput(f"bad image reference {text!r}: invalid tag {tag!r}")
    return ImageRef(transport, path=path, tag=tag or None)


def parse_docker(text: str) -> ImageRef:
    """HOST[:PORT]/REPO[:TAG|@DIGEST] (docker's normalization for names without a host)."""
    name, at, digest = text.partition("@")
    if at and not is_digest(digest):
        raise InvalidInput(f"bad image reference {text!r}: {digest!r} is not a sha256 digest")
    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, remainder
    else:
        registry, path = DOCKER_HUB, name
    tag = None
    colon = path.rfind(":")
    if colon >= 0:
        path, tag = path[:colon], path[colon + 1:]
        if not _TAG_RE.match(tag):
            raise InvalidInput(f"bad image reference {text!r}: invalid tag {tag!r}")
    if registry == DOCKER_HUB and "/" not in path:
        path = "library/" + path
    if not _HOST_RE.match(registry):
        raise InvalidInput(f"bad image reference {text!r}: invalid registry host {registry!r}")
    if not _REPO_RE.match(path):
        raise InvalidInput(f"bad image reference {text!r}: invalid repository name {path!r} "
                           "(lower-case letters, digits and . _ - separators)")
    if tag is None and not at:
        tag = DEFAULT_TAG
    return ImageRef("docker", registry=registry, repository=path, tag=tag, digest=digest or None)
