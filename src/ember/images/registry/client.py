"""A client of the OCI distribution API, pull side, on httpx.

One :class:`RegistryClient` talks to one registry host. It

* finds the scheme: HTTPS, verified; plain HTTP only for a loopback registry
  or one ``registries.conf`` names insecure, and only when the server does
  not speak TLS;
* authenticates the way the registry asks in its 401 (``WWW-Authenticate``):
  Bearer tokens from the realm, per repository scope, cached until they
  expire; or Basic with the user's credentials;
* retries 429 and 5xx answers with backoff, honouring ``Retry-After``, and
  failed connections; follows redirects itself (at most five), never
  sending ``Authorization`` to another host;
* fetches manifests (capped at 4 MiB, checked against the digest asked for)
  and blobs into a ``.part`` file, hashing as they arrive, resuming with
  ``Range`` from what the file already holds, and checking size and digest.

Every failure is a :class:`~ember.errors.RegistryError` with one line that
names the registry and what went wrong.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import fcntl
import functools
import hashlib
import json
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urljoin, urlsplit

from ember import __version__
from ember._httpx import httpx
from ember.errors import (
    RegistryAuthError,
    RegistryError,
    RegistryNotFound,
)
from ember.images import oci

if TYPE_CHECKING:
    from ember.images.registry.config import Credentials

#: What a pull accepts as a manifest; registry 2.8 rewrites or refuses
#: manifests whose types the Accept header leaves out.
MANIFEST_TYPES = (oci.OCI_INDEX, oci.OCI_MANIFEST, oci.DOCKER_MANIFEST_LIST,
                  oci.DOCKER_MANIFEST)
SCHEMA1_TYPES = ("application/vnd.docker.distribution.manifest.v1+json",
                 "application/vnd.docker.distribution.manifest.v1+prettyjws")
MAX_MANIFEST = 4 << 20
MAX_CONFIG = 8 << 20
MAX_REDIRECTS = 5
#: Attempts per request (429, 5xx, failed connections) and per blob (bodies cut short).
ATTEMPTS = 5
#: The longest Retry-After honoured; beyond it the pull fails rather than hang.
MAX_RETRY_AFTER = 60.0
_CHUNK = 1 << 20
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

CredentialsLookup = Callable[[str], "Credentials | None"]


@dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: ``Bearer realm="…",service="…"``."""

    scheme: str  #: lowercase: "bearer" or "basic"
    params: dict[str, str]


_PARAM_RE = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> Challenge | None:
    """The first challenge of a ``WWW-Authenticate`` header (registries send one)."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if m is None or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else (m.group(3) or "")
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return Challenge(scheme.lower(), params)


def retry_after(value: str | None, default: float) -> float:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value:
        return default
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return default


def _registry_message(resp: httpx.Response) -> str:
    """The first error of a registry's JSON error body, or the HTTP reason."""
    with contextlib.suppress(ValueError, KeyError, TypeError, IndexError, httpx.ResponseNotRead):
        err = json.loads(resp.content[:65536])["errors"][0]
        code, message = str(err.get("code", "")), str(err.get("message", ""))
        text = f"{message} ({code})" if code and message else message or code
        if text:
            return " ".join(text.split())[:200]
    return f"HTTP {resp.status_code} {resp.reason_phrase}".strip()


def _transport_message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def _is_tls_mismatch(exc: BaseException) -> bool:
    """An HTTPS attempt at a server that speaks plain HTTP."""
    text = str(exc).lower()
    return any(s in text for s in ("wrong version number", "record layer failure",
                                   "packet length too long", "unknown protocol",
                                   "http request"))


def _is_tls_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "ssl" in text or "certificate" in text or "tls" in text


@dataclass
class _Token:
    value: str
    expires: float  #: time.monotonic() after which it is not used


class RegistryClient:
    """The pull side of the distribution API for one registry host.

    ``host``: ``HOST[:PORT]`` to send requests to (``registry-1.docker.io`` for
    Docker Hub). ``name``: the registry as users name it, for messages and
    credentials (``docker.io``). ``plain_http_ok``: whether plain HTTP may be
    used when the server does not speak TLS (loopback, or insecure).
    ``credentials``: looked up per repository, only once the registry asks.
    Thread-safe: blobs of one pull are fetched on several threads.
    """

    def __init__(self, host: str, *, name: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, plain_http_ok: bool = False,
                 credentials: CredentialsLookup | None = None, timeout: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.host = host
        self.name = name or host
        self._plain_ok = plain_http_ok
        self._credentials = credentials or (lambda _repo: None)
        self._sleep = sleep
        self._http = httpx.Client(
            verify=ssl_context if ssl_context is not None else True,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=False, trust_env=False,
            headers={"User-Agent": f"ember/{__version__}"},
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=8))
        self._base: str | None = None
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str, str], _Token] = {}
        #: repository -> how to authenticate its requests (a challenge seen)
        self._challenges: dict[str, Challenge] = {}
        self._creds_cache: dict[str, Credentials | None] = {}

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the scheme -----------------------------------------------------------

    def base_url(self) -> str:
        """``https://HOST`` (or ``http://HOST`` where allowed and TLS is not spoken)."""
        with self._lock:
            if self._base is not None:
                return self._base
        base = f"https://{self.host}"
        try:
            self._http.get(f"{base}/v2/").close()
        except httpx.TransportError as exc:
            if self._plain_ok and _is_tls_mismatch(exc):
                base = f"http://{self.host}"
            elif isinstance(exc, httpx.ConnectError) and _is_tls_error(exc):
                raise RegistryError(self._tls_message(exc)) from None
            else:
                raise RegistryError(f"cannot reach registry {self.name}: "
                                    f"{_transport_message(exc)}") from None
        with self._lock:
            self._base = base
        return base

    def _tls_message(self, exc: BaseException) -> str:
        return (f"TLS failure talking to registry {self.name}: {_transport_message(exc)} "
                f"(trust its CA with --ca-cert or /etc/containers/certs.d/{self.host}/ca.crt)")

    # --- auth -----------------------------------------------------------------

    def _creds(self, repo: str) -> Credentials | None:
        with self._lock:
            if repo in self._creds_cache:
                return self._creds_cache[repo]
        creds = self._credentials(repo)
        with self._lock:
            self._creds_cache[repo] = creds
        return creds

    def _auth_header(self, repo: str) -> str | None:
        with self._lock:
            challenge = self._challenges.get(repo)
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = self._creds(repo)
            if creds is None:
                return None
            raw = f"{creds.username}:{creds.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        if challenge.scheme == "bearer":
            return "Bearer " + self._token(repo, challenge)
        return None

    def _token(self, repo: str, challenge: Challenge) -> str:
        realm = challenge.params.get("realm", "")
        service = challenge.params.get("service", "")
        scope = f"repository:{repo}:pull"
        key = (realm, service, scope)
        with self._lock:
            cached = self._tokens.get(key)
            if cached is not None and cached.expires > time.monotonic():
                return cached.value
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(f"registry {self.name} sent a token realm that is not a URL: "
                                f"{realm[:80]!r}")
        if realm.startswith("http://") and not self._plain_ok:
            raise RegistryError(f"registry {self.name} wants credentials sent to a plain-HTTP "
                                f"token server ({realm[:80]}): refused")
        creds = self._creds(repo)
        query = [("service", service)] if service else []
        query.append(("scope", scope))
        started = time.monotonic()
        try:
            if creds is not None and creds.identity_token is not None:
                resp = self._retrying(lambda: self._http.post(
                    realm, data={"grant_type": "refresh_token", "refresh_token":
                                 creds.identity_token or "", "service": service,
                                 "scope": scope, "client_id": "ember"}))
            else:
                auth = (creds.username, creds.password) if creds is not None else None
                resp = self._retrying(lambda: self._http.get(
                    f"{realm}{'&' if '?' in realm else '?'}{urlencode(query)}",
                    auth=auth))
        except httpx.TransportError as exc:
            raise RegistryError(f"cannot reach the token server of registry {self.name} "
                                f"({urlsplit(realm).netloc}): {_transport_message(exc)}") from None
        if resp.status_code in (401, 403):
            raise RegistryAuthError(self._refused(repo, creds, _registry_message(resp)))
        if resp.status_code != 200:
            raise RegistryError(f"the token server of registry {self.name} answered "
                                f"{_registry_message(resp)}")
        try:
            doc = resp.json()
            token = doc.get("token") or doc.get("access_token")
            expires_in = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"the token server of registry {self.name} sent no token")
        with self._lock:
            # a little early: the clock started before the request
            self._tokens[key] = _Token(token, started + max(expires_in - 5, 1))
        return token

    def _refused(self, repo: str, creds: Credentials | None, detail: str) -> str:
        if creds is None:
            return (f"registry {self.name} requires authentication for {repo} ({detail}): "
                    f"run `ember login {self.name}`")
        return (f"registry {self.name} refused the credentials of {creds.username!r} for "
                f"{repo} (from {creds.source}): {detail}")

    # --- requests -------------------------------------------------------------

    def _retrying(self, send: Callable[[], httpx.Response]) -> httpx.Response:
        """``send`` again after 429/5xx answers or failed connections, with backoff."""
        delay = 0.5
        for attempt in range(ATTEMPTS):
            last = attempt == ATTEMPTS - 1
            try:
                resp = send()
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError,
                    httpx.ReadError, httpx.ReadTimeout) as exc:
                if last or (isinstance(exc, httpx.ConnectError) and _is_tls_error(exc)):
                    raise
                self._sleep(delay)
                delay = min(delay * 2, 8.0)
                continue
            if resp.status_code not in _RETRY_STATUS or last:
                return resp
            wait = retry_after(resp.headers.get("retry-after"), delay)
            resp.close()
            if wait > MAX_RETRY_AFTER:
                raise RegistryError(f"registry {self.name} asks to retry in {wait:.0f} s "
                                    f"(HTTP {resp.status_code}): try again later")
            self._sleep(wait)
            delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def request(self, method: str, repo: str, path: str,
                headers: dict[str, str] | None = None) -> Iterator[httpx.Response]:
        """Send ``method`` to ``/v2/<repo>/<path>`` and yield the streamed response.

        Authenticates as the registry asks (once per challenge), retries, and
        follows redirects (without ``Authorization`` to another host). The
        response is closed on exit.
        """
        url = f"{self.base_url()}/v2/{repo}/{path}"
        headers = dict(headers or {})
        tried_auth = False
        redirects = 0
        origin = urlsplit(url).netloc
        while True:
            send_headers = dict(headers)
            if urlsplit(url).netloc == origin:
                auth = self._auth_header(repo)
                if auth is not None:
                    send_headers["Authorization"] = auth
            req = self._http.build_request(method, url, headers=send_headers)
            try:
                resp = self._retrying(functools.partial(self._http.send, req, stream=True))
            except httpx.TransportError as exc:
                if isinstance(exc, httpx.ConnectError) and _is_tls_error(exc):
                    raise RegistryError(self._tls_message(exc)) from None
                raise RegistryError(f"cannot reach registry {self.name}: "
                                    f"{_transport_message(exc)}") from None
            if resp.status_code == 401 and not tried_auth and urlsplit(url).netloc == origin:
                challenge = parse_challenge(resp.headers.get("www-authenticate", ""))
                resp.read()
                resp.close()
                if challenge is None or challenge.scheme not in ("bearer", "basic"):
                    raise RegistryAuthError(f"registry {self.name} wants an authentication "
                                            "scheme Ember does not speak")
                with self._lock:
                    self._challenges[repo] = challenge
                if challenge.scheme == "basic" and self._creds(repo) is None:
                    raise RegistryAuthError(self._refused(repo, None, "unauthorized"))
                tried_auth = True
                continue
            if resp.status_code in (301, 302, 303, 307, 308):
                location = resp.headers.get("location")
                resp.close()
                redirects += 1
                if not location or redirects > MAX_REDIRECTS:
                    raise RegistryError(f"registry {self.name}: too many redirects (or one "
                                        f"without a Location) for {path}")
                url = urljoin(url, location)
                if urlsplit(url).scheme not in ("http", "https"):
                    raise RegistryError(f"registry {self.name} redirected to {url[:80]!r}")
                continue
            try:
                if resp.status_code in (401, 403):
                    resp.read()
                    raise RegistryAuthError(self._refused(repo, self._creds(repo),
                                                          _registry_message(resp)))
                yield resp
            finally:
                resp.close()
            return

    # --- manifests and blobs --------------------------------------------------

    def manifest(self, repo: str, target: str) -> tuple[bytes, str, str]:
        """Fetch the manifest (or index) ``target`` (a tag or digest) of ``repo``.

        Returns (bytes, media type, digest). A digest target must match; for a
        tag, a ``Docker-Content-Digest`` header must match the bytes.

        Raises:
            RegistryNotFound: no such repository or manifest.
            RegistryError: schema 1, too large, a digest mismatch, types disagreeing.
        """
        with self.request("GET", repo, f"manifests/{target}",
                          {"Accept": ", ".join(MANIFEST_TYPES)}) as resp:
            if resp.status_code == 404:
                resp.read()
                raise RegistryNotFound(f"{self.name}/{repo}:{target} not found in the registry:"
                                       f" {_registry_message(resp)}" if not
                                       target.startswith("sha256:") else
                                       f"{self.name}/{repo}@{target} not found in the "
                                       f"registry: {_registry_message(resp)}")
            if resp.status_code != 200:
                resp.read()
                raise RegistryError(f"registry {self.name} answered {_registry_message(resp)} "
                                    f"for the manifest {repo}:{target}")
            data = self._read_capped(resp, MAX_MANIFEST, f"manifest {repo}:{target}")
            header_digest = resp.headers.get("docker-content-digest")
            content_type = resp.headers.get("content-type", "").split(";")[0].strip()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if target.startswith("sha256:") and digest != target:
            raise RegistryError(f"manifest {repo}@{target} from registry {self.name} does not "
                                f"match its digest (got {digest[:19]}…)")
        if (header_digest and header_digest.startswith("sha256:") and header_digest != digest):
            raise RegistryError(f"manifest {repo}:{target} from registry {self.name} does not "
                                f"match the digest the registry gave ({header_digest[:19]}…)")
        if content_type in SCHEMA1_TYPES:
            raise RegistryError(f"{self.name}/{repo}:{target} is a Docker schema 1 manifest, "
                                "deprecated since 2017 and not supported: push it again with "
                                "a current docker, podman or skopeo")
        declared = oci.document_media_type(data, content_type if content_type in
                                           MANIFEST_TYPES else "")
        if declared in SCHEMA1_TYPES or _schema_version(data) == 1:
            raise RegistryError(f"{self.name}/{repo}:{target} is a Docker schema 1 manifest, "
                                "not supported: push it again with a current tool")
        if content_type in MANIFEST_TYPES and declared != content_type:
            raise RegistryError(f"manifest {repo}:{target}: the registry says {content_type} "
                                f"but the document says {declared}")
        if declared not in MANIFEST_TYPES:
            raise RegistryError(f"manifest {repo}:{target} has unsupported media type "
                                f"{(declared or content_type or 'none')!r}")
        return data, declared, digest

    def small_blob(self, repo: str, desc: oci.Descriptor, limit: int = MAX_CONFIG) -> bytes:
        """A blob read into memory (an image config), checked against ``desc``."""
        if desc.size > limit:
            raise RegistryError(f"blob {desc.digest[:19]}… of {repo} is too large "
                                f"({desc.size} bytes)")
        with self.request("GET", repo, f"blobs/{desc.digest}",
                          {"Accept-Encoding": "identity"}) as resp:
            self._check_blob_status(resp, repo, desc.digest)
            data = self._read_capped(resp, limit, f"blob {desc.digest[:19]}…")
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != desc.digest or len(data) != desc.size:
            raise RegistryError(f"blob {desc.digest[:19]}… from registry {self.name} does not "
                                f"match its digest or size")
        return data

    def fetch_blob(self, repo: str, desc: oci.Descriptor, part: Path,
                   on_bytes: Callable[[int], None] | None = None) -> None:
        """Download blob ``desc`` into ``part``, resuming what ``part`` already holds.

        ``on_bytes`` is told of every chunk written (bytes already there
        included, once, at the start). On return ``part`` holds exactly the
        blob, verified and fsynced; on a digest mismatch it is emptied (its
        bytes are not to be trusted by a later resume) and RegistryError raised.
        """
        tell = on_bytes or (lambda _n: None)
        with open(part, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # one writer per blob, across processes
            have, h = self._rehash(f, desc.size)
            tell(have)
            delay = 0.5
            for attempt in range(ATTEMPTS):
                if have == desc.size:
                    break
                headers = {"Accept-Encoding": "identity"}
                if have:
                    headers["Range"] = f"bytes={have}-"
                try:
                    with self.request("GET", repo, f"blobs/{desc.digest}", headers) as resp:
                        self._check_blob_status(resp, repo, desc.digest)
                        if have and not _resumes_at(resp, have):
                            f.truncate(0)
                            tell(-have)
                            have, h = 0, hashlib.sha256()
                        f.seek(0, os.SEEK_END)
                        for chunk in resp.iter_raw():  # as it arrives: kept on a cut
                            if have + len(chunk) > desc.size:
                                raise RegistryError(
                                    f"blob {desc.digest[:19]}… from registry {self.name} is "
                                    f"larger than its {desc.size} bytes")
                            f.write(chunk)
                            h.update(chunk)
                            have += len(chunk)
                            tell(len(chunk))
                except httpx.TransportError as exc:  # the body was cut: resume from here
                    f.flush()
                    if attempt == ATTEMPTS - 1:
                        raise RegistryError(
                            f"downloading blob {desc.digest[:19]}… from registry {self.name} "
                            f"failed after {ATTEMPTS} attempts: {_transport_message(exc)}"
                        ) from None
                    self._sleep(delay)
                    delay = min(delay * 2, 8.0)
                    continue
                if have != desc.size:  # a body that ended early without an error
                    f.flush()
                    if attempt == ATTEMPTS - 1:
                        raise RegistryError(f"blob {desc.digest[:19]}… from registry "
                                            f"{self.name} stopped early ({have} of "
                                            f"{desc.size} bytes)")
                    continue
            if have != desc.size:
                raise RegistryError(f"blob {desc.digest[:19]}… from registry {self.name} "
                                    f"stopped early ({have} of {desc.size} bytes)")
            if "sha256:" + h.hexdigest() != desc.digest:
                f.truncate(0)
                raise RegistryError(f"blob {desc.digest[:19]}… from registry {self.name} does "
                                    "not match its digest: it was corrupted in the registry "
                                    "or on the way")
            f.flush()
            os.fsync(f.fileno())

    @staticmethod
    def _rehash(f: Any, size: int) -> tuple[int, Any]:
        """Hash what a ``.part`` file already holds (emptied if longer than the blob)."""
        h = hashlib.sha256()
        f.seek(0, os.SEEK_END)
        have = f.tell()
        if have > size:
            f.truncate(0)
            return 0, h
        f.seek(0)
        left = have
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
        return have - left, h

    def _check_blob_status(self, resp: httpx.Response, repo: str, digest: str) -> None:
        if resp.status_code in (200, 206):
            return
        resp.read()
        if resp.status_code == 404:
            raise RegistryNotFound(f"registry {self.name} has no blob {digest[:19]}… in {repo}:"
                                   f" {_registry_message(resp)}")
        if resp.status_code == 416:
            raise RegistryError(f"registry {self.name} refused the range asked for blob "
                                f"{digest[:19]}… (HTTP 416)")
        raise RegistryError(f"registry {self.name} answered {_registry_message(resp)} for blob "
                            f"{digest[:19]}…")

    def _read_capped(self, resp: httpx.Response, limit: int, what: str) -> bytes:
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RegistryError(f"{what} from registry {self.name} is too large "
                                f"({int(length)} bytes; at most {limit})")
        out = bytearray()
        try:
            for chunk in resp.iter_bytes(65536):
                out += chunk
                if len(out) > limit:
                    raise RegistryError(f"{what} from registry {self.name} is too large "
                                        f"(more than {limit} bytes)")
        except httpx.TransportError as exc:
            raise RegistryError(f"{what} from registry {self.name} stopped early: "
                                f"{_transport_message(exc)}") from None
        return bytes(out)


def _resumes_at(resp: httpx.Response, offset: int) -> bool:
    """Whether ``resp`` continues a blob at ``offset`` (206 with a matching range)."""
    if resp.status_code != 206:
        return False
    m = re.match(r"bytes\s+(\d+)-", resp.headers.get("content-range", ""))
    return m is not None and int(m.group(1)) == offset


def _schema_version(data: bytes) -> int | None:
    with contextlib.suppress(ValueError, AttributeError):
        v = json.loads(data).get("schemaVersion")
        return v if isinstance(v, int) else None
    return None
