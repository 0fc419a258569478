"""A client of the OCI distribution API (httpx): manifests, blobs, uploads, cross-repo mounts.

Authentication follows the registry's challenge: anonymous first, then Basic
with the credentials found (auth.py), or a Bearer token from the realm the
challenge names (with those credentials, or anonymous), cached per scope.
Transient failures (connection errors, 429, 500, 502, 503, 504) are retried
with a short back-off; a blob download that breaks off resumes with a Range
request from where it stopped. Every failure ends as one line naming the
registry, the object and the answer.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ..errors import FusesnapError, IntegrityError, NotFound
from . import manifest as mf
from .auth import Credentials, find_credentials, parse_challenge
from .reference import DOCKER_HUB, ImageRef

log = logging.getLogger("fusesnap.images")

RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_MANIFEST = 4 << 20  # the distribution spec's suggested limit for manifests
CHUNK = 1 << 20
USER_AGENT = "fusesnap"


class RegistryError(FusesnapError):
    """The registry refused or failed a request."""


class Unauthorized(RegistryError):
    """Missing or wrong credentials."""


@dataclass
class RemoteOptions:
    plain_http: bool = False
    tls_verify: bool = True
    creds: str | None = None
    authfile: str | None = None
    retries: int = 3
    backoff: float = 0.5     # seconds before the first retry, doubled each time
    timeout: float = 60.0


def _ssl_context(host: str) -> ssl.SSLContext:
    """The system's CAs plus containers' per-registry ones (certs.d/HOST/*.crt)."""
    ctx = ssl.create_default_context()
    dirs = [Path("/etc/containers/certs.d") / host, Path("/etc/docker/certs.d") / host,
            Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "containers" / "certs.d" / host]
    for d in dirs:
        if d.is_dir():
            for crt in sorted(d.glob("*.crt")):
                ctx.load_verify_locations(cafile=str(crt))
    return ctx


class RegistryClient:
    def __init__(self, ref: ImageRef, opts: RemoteOptions, push: bool = False) -> None:
        self.ref, self.opts = ref, opts
        self.host = "registry-1.docker.io" if ref.registry == DOCKER_HUB else ref.registry
        self.base = f"{'http' if opts.plain_http else 'https'}://{self.host}"
        self.repo = ref.repository
        self.actions = "pull,push" if push else "pull"
        self.creds: Credentials | None = find_credentials(ref.registry, ref.repository, opts.creds, opts.authfile)
        verify: Any = _ssl_context(self.host) if opts.tls_verify and not opts.plain_http else False
        self.http = httpx.Client(verify=verify, follow_redirects=True, headers={"User-Agent": USER_AGENT},
                                 timeout=httpx.Timeout(opts.timeout, connect=min(opts.timeout, 15.0)))
        self._auth: str | None = None          # the Authorization header in use
        self._challenge: tuple[str, dict[str, str]] | None = None
        self._tokens: dict[str, str] = {}      # scope -> bearer token

    def close(self) -> None:
        self.http.close()

    # -- requests -------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base + path

    def request(self, method: str, path: str, what: str, *, ok: tuple[int, ...] = (200,),
                headers: dict[str, str] | None = None, body: Callable[[], Any] | None = None,
                params: dict[str, str] | None = None, stream: bool = False,
                extra_scope: str | None = None) -> httpx.Response:
        """Send with auth and retries; return a response whose status is in `ok` (or 404 if asked)."""
        attempt, authed = 0, False
        while True:
            h = dict(headers or {})
            if self._auth:
                h["Authorization"] = self._auth
            try:
                req = self.http.build_request(method, self._url(path), headers=h, params=params,
                                              content=body() if body else None)
                resp = self.http.send(req, stream=stream)
            except httpx.TransportError as e:
                if attempt < self.opts.retries:
                    attempt += 1
                    log.info("%s %s: %s; retry %d", method, what, e, attempt)
                    time.sleep(self.opts.backoff * 2 ** (attempt - 1))
                    continue
                hint = " (a plain-HTTP registry? use --plain-http)" if "WRONG_VERSION_NUMBER" in str(e) else ""
                raise RegistryError(f"cannot reach {self.host} ({what}): {e or type(e).__name__}{hint}") from None
            if resp.status_code in ok:
                return resp
            if resp.status_code == 401 and not authed and resp.headers.get("www-authenticate"):
                authed = True
                challenge = resp.headers.get("www-authenticate", "")
                resp.close()
                self._authenticate(challenge, extra_scope)
                continue
            if resp.status_code in RETRY_STATUS and attempt < self.opts.retries:
                attempt += 1
                resp.close()
                log.info("%s %s: %d; retry %d", method, what, resp.status_code, attempt)
                time.sleep(self.opts.backoff * 2 ** (attempt - 1))
                continue
            raise self._error(resp, method, what)

    def _error(self, resp: httpx.Response, method: str, what: str) -> FusesnapError:
        try:
            resp.read()
            errors = resp.json().get("errors") or []
            detail = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)
        except Exception:  # any body at all: HTML, nothing, not JSON
            detail = ""
        finally:
            resp.close()
        where = f"{self.host}/{self.repo}"
        code = resp.status_code
        tail = f" ({detail})" if detail else ""
        if code in (401, 403):
            who = f"as {self.creds.username!r}" if self.creds else "anonymously (give --creds USER:PASS or log in)"
            return Unauthorized(f"{where} refused {what} {who}: {code} {resp.reason_phrase}{tail}")
        if code == 404:
            return NotFound(f"{what} not found in {where} (404){tail}")
        return RegistryError(f"{where} answered {code} {resp.reason_phrase} to {method} {what}{tail}")

    def _authenticate(self, challenge: str, extra_scope: str | None) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if not self.creds:
                raise Unauthorized(f"{self.host} requires authentication: give --creds USER:PASS or log in "
                                   "(auth.json / ~/.docker/config.json)")
            raw = f"{self.creds.username}:{self.creds.password}".encode()
            self._auth = "Basic " + base64.b64encode(raw).decode()
            return
        if scheme != "bearer" or "realm" not in params:
            raise Unauthorized(f"{self.host} asks for unsupported authentication {challenge!r}")
        if self._auth and self._auth.startswith("Bearer "):
            self._tokens.clear()  # the token we sent was refused (expired, or too narrow): ask anew
        self._challenge = (scheme, params)
        self._auth = "Bearer " + self._token(params, extra_scope)

    def _token(self, params: dict[str, str], extra_scope: str | None) -> str:
        scope = f"repository:{self.repo}:{self.actions}"
        scopes = [scope] + ([extra_scope] if extra_scope else [])
        key = " ".join(scopes)
        if key in self._tokens:
            return self._tokens[key]
        q: list[tuple[str, str]] = [("scope", s) for s in scopes]
        if params.get("service"):
            q.append(("service", params["service"]))
        auth = (self.creds.username, self.creds.password) if self.creds else None
        try:
            r = self.http.get(params["realm"], params=q, auth=auth)
        except httpx.TransportError as e:
            raise RegistryError(f"cannot reach the token service {params['realm']}: {e}") from None
        if r.status_code in (401, 403):
            who = f"for {self.creds.username!r}" if self.creds else "anonymously"
            raise Unauthorized(f"the token service of {self.host} refused {who}: {r.status_code} {r.reason_phrase}")
        if r.status_code != 200:
            raise RegistryError(f"the token service of {self.host} answered {r.status_code} {r.reason_phrase}")
        try:
            doc = r.json()
            token = doc.get("token") or doc.get("access_token")
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"the token service of {self.host} sent no token")
        self._tokens[key] = token
        return token

    # -- manifests ------------------------------------------------------------------------
    def _read_capped(self, r: httpx.Response, limit: int, what: str) -> bytes:
        """The body of a streamed response, refused once it exceeds `limit` bytes."""
        out = bytearray()
        try:
            for b in r.iter_bytes():
                out += b
                if len(out) > limit:
                    raise IntegrityError(f"{what} from {self.host} is larger than {limit} bytes")
        except httpx.TransportError as e:
            raise RegistryError(f"reading {what} from {self.host} failed: {e}") from None
        finally:
            r.close()
        return bytes(out)

    def get_manifest(self, reference: str) -> tuple[bytes, str | None]:
        what = f"manifest {reference}"
        r = self.request("GET", f"/v2/{self.repo}/manifests/{reference}", what,
                         headers={"Accept": ", ".join(mf.ACCEPT)}, stream=True)
        return self._read_capped(r, MAX_MANIFEST, what), r.headers.get("content-type")

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> None:
        self.request("PUT", f"/v2/{self.repo}/manifests/{reference}", f"manifest {reference}", ok=(200, 201),
                     headers={"Content-Type": media_type}, body=lambda: data)

    # -- blobs ----------------------------------------------------------------------------
    def blob_bytes(self, desc: mf.Descriptor, what: str = "blob") -> bytes:
        """A small blob (a config), no longer than its descriptor says."""
        label = f"{what} {desc.digest}"
        r = self.request("GET", f"/v2/{self.repo}/blobs/{desc.digest}", label, stream=True)
        return self._read_capped(r, desc.size, label)

    def download(self, desc: mf.Descriptor, path: Path, progress: Callable[[int], None]) -> None:
        """Fetch a blob into `path` (resuming a partial file), verifying size and digest as it streams."""
        h = hashlib.sha256()
        have = path.stat().st_size if path.exists() else 0
        if have > desc.size:
            path.unlink()
            have = 0
        if have:
            with open(path, "rb") as f:
                while b := f.read(CHUNK):
                    h.update(b)
            progress(have)
        attempt = 0
        while have < desc.size or desc.size == 0:
            headers = {"Range": f"bytes={have}-"} if have else {}
            r = self.request("GET", f"/v2/{self.repo}/blobs/{desc.digest}", f"blob {desc.digest}",
                             ok=(200, 206), headers=headers, stream=True)
            try:
                if have and r.status_code == 200:  # no range support: start over
                    h, have = hashlib.sha256(), 0
                    progress(-path.stat().st_size)
                with open(path, "ab" if have else "wb", buffering=0) as f:  # readers follow the file
                    for b in r.iter_bytes():  # as it arrives: a chunk size would buffer (progress, resume)
                        have += len(b)
                        if have > desc.size:
                            break
                        h.update(b)
                        f.write(b)
                        progress(len(b))
            except httpx.TransportError as e:
                attempt += 1
                if attempt > self.opts.retries:
                    raise RegistryError(f"download of blob {desc.digest} from {self.host} failed: {e}") from None
                log.info("blob %s: %s after %d bytes; resuming", desc.digest, e, have)
                continue
            finally:
                r.close()
            if have < desc.size:
                path.unlink(missing_ok=True)
                raise IntegrityError(f"blob {desc.digest} is truncated: {have} of {desc.size} bytes")
            break
        if have > desc.size:
            path.unlink(missing_ok=True)
            raise IntegrityError(f"blob {desc.digest} is longer than the {desc.size} bytes its descriptor says")
        got = "sha256:" + h.hexdigest()
        if got != desc.digest:
            path.unlink(missing_ok=True)
            raise IntegrityError(f"blob {desc.digest} does not match its content (sha256 is {got})")

    def has_blob(self, desc: mf.Descriptor) -> bool:
        r = self.request("HEAD", f"/v2/{self.repo}/blobs/{desc.digest}", f"blob {desc.digest}", ok=(200, 404))
        r.close()
        return r.status_code == 200

    def mount_blob(self, desc: mf.Descriptor, from_repo: str) -> bool:
        """Cross-repository mount: True when the registry linked the blob without an upload."""
        r = self.request("POST", f"/v2/{self.repo}/blobs/uploads/", f"mount of {desc.digest}", ok=(201, 202),
                         params={"mount": desc.digest, "from": from_repo},
                         extra_scope=f"repository:{from_repo}:pull")
        r.close()
        if r.status_code == 202:
            self._cancel(r)
        return r.status_code == 201

    def _cancel(self, r: httpx.Response) -> None:
        loc = r.headers.get("location")
        if loc:
            try:
                self.request("DELETE", self._resolve(r, loc), "upload cancel", ok=(200, 202, 204, 404)).close()
            except FusesnapError:
                pass  # an unused upload session expires by itself

    def _resolve(self, r: httpx.Response, loc: str) -> str:
        return str(r.request.url.join(loc))

    def upload(self, desc: mf.Descriptor, src: Path | bytes, progress: Callable[[int], None]) -> None:
        """Monolithic upload: POST for a session, PUT the bytes with ?digest=."""
        r = self.request("POST", f"/v2/{self.repo}/blobs/uploads/", f"upload of {desc.digest}", ok=(202,))
        r.close()
        loc = r.headers.get("location")
        if not loc:
            raise RegistryError(f"{self.host} started an upload without a Location")
        url = httpx.URL(self._resolve(r, loc))
        url = url.copy_merge_params({"digest": desc.digest})

        def body() -> Any:
            return src if isinstance(src, bytes) else _file_chunks(src, progress)

        self.request("PUT", str(url), f"blob {desc.digest}", ok=(201, 204), body=body,
                     headers={"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)})
        if isinstance(src, bytes):
            progress(len(src))


def _file_chunks(path: Path, progress: Callable[[int], None]) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            progress(len(b))
            yield b
