"""OCI / Docker v2 schema 2 manifests, indexes (manifest lists) and image configs.

Parsing validates what the pull relies on (media types, digests, sizes, the
config's rootfs) and keeps the bytes verbatim: digests are over the bytes a
registry or layout holds, so nothing here re-serializes what it read.
"""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from ..digest import is_digest
from ..errors import InvalidInput

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
# What a registry is asked for, best first.
ACCEPT = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)

LAYER_COMPRESSION = {
    OCI_LAYER: "none", OCI_LAYER_ND: "none", "application/vnd.docker.image.rootfs.diff.tar": "none",
    OCI_LAYER_GZIP: "gzip", OCI_LAYER_ND + "+gzip": "gzip", DOCKER_LAYER_GZIP: "gzip", DOCKER_LAYER_FOREIGN: "gzip",
    OCI_LAYER_ZSTD: "zstd", OCI_LAYER_ND + "+zstd": "zstd", DOCKER_LAYER_ZSTD: "zstd",
}
OCI_LAYER_TYPE = {"none": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}
REF_NAME = "org.opencontainers.image.ref.name"


def _obj(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"{what} is not a JSON object")
    return doc


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """OS/ARCH[/VARIANT], e.g. linux/amd64, linux/arm64/v8."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidInput(f"bad platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def host(cls) -> "Platform":
        """This machine's platform in Go's GOARCH names (what indexes list)."""
        m = _platform.machine().lower()
        arch, variant = {
            "x86_64": ("amd64", ""), "amd64": ("amd64", ""), "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
            "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "i686": ("386", ""), "i386": ("386", ""),
            "ppc64le": ("ppc64le", ""), "s390x": ("s390x", ""), "riscv64": ("riscv64", ""),
        }.get(m, (m, ""))
        return cls("linux", arch, variant)

    def matches(self, other: dict[str, Any]) -> bool:
        if other.get("os") != self.os or other.get("architecture") != self.architecture:
            return False
        theirs = other.get("variant") or ""
        if not self.variant or not theirs:
            return True
        return theirs == self.variant or (self.architecture == "arm64" and {theirs, self.variant} <= {"v8", ""})

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict[str, Any] | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, d: Any, what: str) -> "Descriptor":
        if not isinstance(d, dict):
            raise InvalidInput(f"{what} is not a descriptor object")
        digest, size, mt = d.get("digest"), d.get("size"), d.get("mediaType", "")
        if not isinstance(digest, str) or not is_digest(digest):
            raise InvalidInput(f"{what} has no valid sha256 digest ({digest!r})")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"{what} {digest} has no valid size ({size!r})")
        ann = d.get("annotations") or {}
        plat = d.get("platform")
        return cls(mt if isinstance(mt, str) else "", digest, size, plat if isinstance(plat, dict) else None,
                   ann if isinstance(ann, dict) else {})

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.platform:
            d["platform"] = self.platform
        if self.annotations:
            d["annotations"] = self.annotations
        return d


@dataclass
class Manifest:
    """One image's manifest (OCI or Docker v2 schema 2), its bytes kept verbatim."""

    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    raw: bytes

    def compression(self, i: int) -> str:
        """none/gzip/zstd of layer i by its media type; unknown types are refused."""
        mt = self.layers[i].media_type
        try:
            return LAYER_COMPRESSION[mt]
        except KeyError:
            raise InvalidInput(f"layer {self.layers[i].digest} has an unsupported media type {mt!r}") from None


@dataclass
class Index:
    media_type: str
    manifests: list[Descriptor]
    raw: bytes

    def choose(self, want: Platform) -> Descriptor:
        """The manifest for `want`; a one-line error lists the platforms there are."""
        have = []
        for d in self.manifests:
            if d.media_type not in MANIFEST_TYPES + INDEX_TYPES and d.media_type:
                continue
            p = d.platform or {}
            if p.get("os") == "unknown":  # attestation manifests that buildkit adds
                continue
            if want.matches(p):
                return d
            have.append("/".join(x for x in (p.get("os", "?"), p.get("architecture", "?"), p.get("variant")) if x))
        raise InvalidInput(f"no image for platform {want} in the index (it has: {', '.join(have) or 'nothing'}); "
                           "choose one with --platform OS/ARCH")


def media_type_of(data: bytes, header: str | None) -> str:
    """The manifest's media type: its own mediaType field, else the transport's header."""
    doc = _obj(data, "manifest")
    mt = doc.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if header and header.split(";")[0].strip() not in ("application/json", "text/plain", ""):
        return header.split(";")[0].strip()
    if "manifests" in doc:
        return OCI_INDEX
    if doc.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1[0]
    return OCI_MANIFEST


def parse(data: bytes, header: str | None = None) -> Manifest | Index:
    """A manifest or an index; schema 1 and unknown kinds are refused with the reason."""
    mt = media_type_of(data, header)
    doc = _obj(data, "manifest")
    if mt in DOCKER_SCHEMA1:
        raise InvalidInput("Docker schema 1 manifests are not supported (deprecated; the registry should "
                           "serve schema 2 or OCI)")
    if mt in INDEX_TYPES:
        ms = doc.get("manifests")
        if not isinstance(ms, list):
            raise InvalidInput("index has no manifests list")
        return Index(mt, [Descriptor.parse(d, f"index entry {i}") for i, d in enumerate(ms)], data)
    if mt in MANIFEST_TYPES:
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise InvalidInput("manifest has no layers list")
        return Manifest(mt, Descriptor.parse(doc.get("config"), "manifest config"),
                        [Descriptor.parse(d, f"layer {i}") for i, d in enumerate(layers)], data)
    raise InvalidInput(f"unsupported manifest media type {mt!r}")


@dataclass
class ImageConfig:
    """The image config (kept verbatim in `raw`) and the fields fusesnap uses."""

    raw: bytes
    doc: dict[str, Any]

    @classmethod
    def parse(cls, data: bytes) -> "ImageConfig":
        doc = _obj(data, "image config")
        rootfs = doc.get("rootfs")
        if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
            raise InvalidInput("image config has no rootfs.diff_ids")
        for d in rootfs["diff_ids"]:
            if not isinstance(d, str) or not is_digest(d):
                raise InvalidInput(f"image config lists an invalid diff_id {d!r}")
        return cls(data, doc)

    @property
    def diff_ids(self) -> list[str]:
        return list(self.doc["rootfs"]["diff_ids"])

    @property
    def runtime(self) -> dict[str, Any]:
        """Entrypoint, Cmd, Env, WorkingDir, User, ... (the config's `config` object)."""
        c = self.doc.get("config")
        return c if isinstance(c, dict) else {}

    @property
    def platform(self) -> str:
        parts = [self.doc.get("os", "?"), self.doc.get("architecture", "?")]
        if self.doc.get("variant"):
            parts.append(self.doc["variant"])
        return "/".join(str(p) for p in parts)


def dumps(doc: dict[str, Any]) -> bytes:
    """Compact JSON for the manifests and configs fusesnap writes itself."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def oci_manifest(config: Descriptor, layers: list[Descriptor], annotations: dict[str, str] | None = None) -> bytes:
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.to_json(),
                           "layers": [d.to_json() for d in layers]}
    if annotations:
        doc["annotations"] = annotations
    return dumps(doc)
