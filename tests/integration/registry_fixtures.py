"""Real registries, a token server and misbehaving HTTP servers for the pull tests.

Everything listens on 127.0.0.0/8 only and lives in a temporary directory the
caller gives. Every server is a context manager and has ``stop()``::

    from registry_fixtures import busybox_layout, start_registry

    with start_registry(tmp_path, tls=True, auth="htpasswd") as reg:
        digest = reg.push(busybox_layout(tmp_path / "bb"), "library/bb:1")
        ...                     # reg.url, reg.ca, reg.users

What is here:

- :func:`start_registry` runs Debian's ``docker-registry`` (distribution 2.8)
  as a plain process: anonymous, TLS, htpasswd (Basic) or token (Bearer)
  auth, storage redirects, or any extra configuration.
- :class:`TokenServer` issues real JWTs (RS256, ``x5c`` header) the registry
  verifies against its ``rootcertbundle``.
- :class:`FaultProxy` sits in front of a plain-HTTP registry and cuts bodies,
  answers 429 or 5xx, or ignores ``Range``, on the tests' say-so.
- :class:`RecordingServer` (on 127.0.0.2) serves blobs by digest and records
  headers: the target of a storage redirect.
- :func:`busybox_layout` and :func:`multiarch_layout` write OCI layouts to push.

Session fixtures in a conftest wrap these directly::

    @pytest.fixture(scope="session")
    def registry(tmp_path_factory):
        with start_registry(tmp_path_factory.mktemp("registry")) as reg:
            yield reg
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime
import functools
import gzip
import hashlib
import http.client
import io
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tarfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import bcrypt
import httpx
import jwt
import zstandard
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ember.sample import DEFAULT_CONFIG, busybox_layers

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
SKOPEO_BIN = shutil.which("skopeo") or "/usr/bin/skopeo"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
IN_TOTO = "application/vnd.in-toto+json"
#: The Accept header naming all four manifest types (what a puller must send).
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))

#: Users of htpasswd and token registries unless told otherwise.
DEFAULT_USERS: Mapping[str, str] = {"alice": "wonderland", "bob": "builder"}

_MTIME = 1_700_000_000


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hex(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexpart):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hexpart


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --- certificates ------------------------------------------------------------------------


@dataclass(frozen=True)
class CertKey:
    cert: x509.Certificate
    key: Any  # a private key object of cryptography

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return bytes(self.key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str = "Ember test CA") -> CertKey:
    """A self-signed CA (EC P-256), valid from a day ago for a week."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertKey(cert, key)


def issue_cert(ca: CertKey, cn: str, *, ips: Sequence[str] = ("127.0.0.1",),
               dns: Sequence[str] = ("localhost",), key: Any = None,
               server: bool = True) -> CertKey:
    """A leaf certificate signed by ``ca``: a TLS server certificate with the SANs given, or
    (``server=False``) a signing certificate with no SANs. ``key`` defaults to a new P-256 key."""
    import ipaddress

    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
    )
    if server:
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        sans += [x509.DNSName(d) for d in dns]
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False))
    builder = builder.add_extension(
        x509.KeyUsage(digital_signature=True, key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                      content_commitment=False, data_encipherment=False, key_agreement=False,
                      key_cert_sign=False, crl_sign=False, encipher_only=False,
                      decipher_only=False), critical=True)
    return CertKey(builder.sign(ca.key, hashes.SHA256()), key)


@functools.lru_cache(maxsize=1)
def _tls_pki() -> tuple[CertKey, CertKey]:
    """The CA and registry server certificate shared by the registries of this process."""
    ca = make_ca("Ember test registry CA")
    return ca, issue_cert(ca, "127.0.0.1")


@functools.lru_cache(maxsize=1)
def _token_pki() -> tuple[CertKey, CertKey]:
    """The CA the registries trust for tokens and the RSA certificate tokens are signed with."""
    ca = make_ca("Ember test token CA")
    return ca, issue_cert(ca, "ember token signer", server=False,
                          key=rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ssl_context(ca: Path | None) -> ssl.SSLContext:
    """A client context trusting only ``ca`` (for httpx: ``verify=ssl_context(reg.ca)``)."""
    return ssl.create_default_context(cafile=str(ca) if ca else None)


# --- image layouts -----------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _busybox_tars(layers: int) -> tuple[bytes, ...]:
    return tuple(busybox_layers(layers))


def layer_with_files(files: Mapping[str, bytes], *, mode: int = 0o644) -> bytes:
    """An uncompressed layer tar holding ``files`` (path -> content) and their parent dirs."""
    buf = io.BytesIO()
    dirs: set[str] = set()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted(files):
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, _MTIME
                    tf.addfile(info)
            data = files[path]
            info = tarfile.TarInfo("/".join(parts))
            info.size, info.mode, info.mtime = len(data), mode, _MTIME
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compress_layer(tar: bytes, compression: str) -> tuple[bytes, str]:
    """(blob, media type) of a layer tar compressed with ``gzip``, ``zstd`` or ``none``."""
    if compression == "gzip":
        return gzip.compress(tar, mtime=0), LAYER_GZIP
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(tar), LAYER_ZSTD
    if compression == "none":
        return tar, LAYER_TAR
    raise ValueError(f"compression must be gzip, zstd or none, not {compression!r}")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _put_blob(layout: Path, data: bytes) -> str:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    digest = sha256_digest(data)
    (blobs / _hex(digest)).write_bytes(data)
    return digest


def _put_image(layout: Path, tars: Sequence[bytes], config: Mapping[str, Any], *,
               compression: str = "gzip", architecture: str = "amd64", os_name: str = "linux",
               variant: str | None = None) -> dict[str, Any]:
    """Write an image's blobs into ``layout``; returns its manifest descriptor (with platform)."""
    layers, diff_ids = [], []
    for tar in tars:
        blob, media_type = compress_layer(tar, compression)
        diff_ids.append(sha256_digest(tar))
        layers.append({"mediaType": media_type, "digest": _put_blob(layout, blob),
                       "size": len(blob)})
    cfg_doc: dict[str, Any] = {
        "architecture": architecture, "os": os_name, "created": "2024-01-01T00:00:00Z",
        "config": dict(config), "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "ember tests"}
                    for _ in tars],
    }
    if variant:
        cfg_doc["variant"] = variant
    cfg = _dumps(cfg_doc)
    manifest = _dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _put_blob(layout, cfg), "size": len(cfg)},
        "layers": layers,
    })
    platform = {"architecture": architecture, "os": os_name}
    if variant:
        platform["variant"] = variant
    return {"mediaType": OCI_MANIFEST, "digest": _put_blob(layout, manifest),
            "size": len(manifest), "platform": platform}


def _write_index_json(layout: Path, entry: dict[str, Any], ref_name: str | None) -> Path:
    entry = dict(entry)
    entry.pop("platform", None)
    if ref_name is not None:
        entry["annotations"] = {"org.opencontainers.image.ref.name": ref_name}
    (layout / "oci-layout").write_bytes(_dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_bytes(_dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                               "manifests": [entry]}))
    return layout


def busybox_layout(dest: Path, *, layers: int = 2, compression: str = "gzip",
                   extra_file: tuple[str, bytes] | None = None,
                   config: Mapping[str, Any] | None = None,
                   ref_name: str | None = "latest") -> Path:
    """A runnable busybox image (the layers of :mod:`ember.sample`, 1 to 3) as an OCI layout.

    ``extra_file=(path, data)`` adds a top layer holding that file: two images made with
    different extra files share their base layers. ``config`` defaults to
    ``ember.sample.DEFAULT_CONFIG`` (``/app/hello.sh``, which needs ``layers >= 2``).
    Deterministic: the same arguments give the same digests. Returns ``dest``.
    """
    tars = list(_busybox_tars(layers))
    if extra_file is not None:
        tars.append(layer_with_files({extra_file[0]: extra_file[1]}))
    dest.mkdir(parents=True, exist_ok=True)
    entry = _put_image(dest, tars, DEFAULT_CONFIG if config is None else config,
                       compression=compression)
    return _write_index_json(dest, entry, ref_name)


def multiarch_layout(dest: Path, *, attestation: bool = True,
                     ref_name: str | None = "latest") -> Path:
    """An OCI layout whose image is an index of linux/amd64 (runnable busybox, 2 gzip layers),
    linux/arm64/v8 (one small layer holding ``/etc/arch``) and, with ``attestation``, a
    buildkit-style attestation manifest (platform unknown/unknown, an in-toto layer)
    referring to the amd64 one. Returns ``dest``; :func:`layout_doc` reads the index."""
    dest.mkdir(parents=True, exist_ok=True)
    amd64 = _put_image(dest, _busybox_tars(2), DEFAULT_CONFIG)
    arm64 = _put_image(dest, [layer_with_files({"etc/arch": b"arm64\n"})],
                       {"Cmd": ["/bin/sh"]}, architecture="arm64", variant="v8")
    manifests = [amd64, arm64]
    if attestation:
        statement = _dumps({"_type": "https://in-toto.io/Statement/v0.1",
                            "predicateType": "https://spdx.dev/Document", "predicate": {}})
        cfg = _dumps({"architecture": "unknown", "os": "unknown", "config": {},
                      "rootfs": {"type": "layers", "diff_ids": [sha256_digest(statement)]}})
        manifest = _dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": _put_blob(dest, cfg),
                       "size": len(cfg)},
            "layers": [{"mediaType": IN_TOTO, "digest": _put_blob(dest, statement),
                        "size": len(statement),
                        "annotations": {"in-toto.io/predicate-type":
                                        "https://spdx.dev/Document"}}],
        })
        manifests.append({
            "mediaType": OCI_MANIFEST, "digest": _put_blob(dest, manifest),
            "size": len(manifest), "platform": {"architecture": "unknown", "os": "unknown"},
            "annotations": {"vnd.docker.reference.digest": amd64["digest"],
                            "vnd.docker.reference.type": "attestation-manifest"},
        })
    index = _dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    entry = {"mediaType": OCI_INDEX, "digest": _put_blob(dest, index), "size": len(index)}
    return _write_index_json(dest, entry, ref_name)


def layout_digest(layout: Path) -> str:
    """The digest of the (single) image of an OCI layout: a manifest or an index.
    ``push(format="oci")`` keeps it: the registry serves the same digest."""
    return str(json.loads((layout / "index.json").read_bytes())["manifests"][0]["digest"])


def layout_doc(layout: Path, digest: str | None = None) -> Any:
    """A JSON blob of a layout (default: its image's manifest or index), parsed."""
    return json.loads(layout_blob(layout, digest or layout_digest(layout)))


def layout_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / _hex(digest)).read_bytes()


# --- HTTP servers ------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: Any

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], OSError):  # clients hanging up are no news
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _headers_dict(self) -> dict[str, str]:
        """The request's headers, names lowercased, repeated ones joined with ", "."""
        out: dict[str, str] = {}
        for k, v in self.headers.items():
            k = k.lower()
            out[k] = f"{out[k]}, {v}" if k in out else v
        return out

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _reply(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
               *, content_type: str = "application/json") -> None:
        self.send_response(status)
        hdrs = {"Content-Type": content_type, **(headers or {})}
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.owner._handle(self)

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET


class _HttpService:
    """A threaded HTTP server on ``host``:free port, served from a daemon thread."""

    scheme = "http"

    def __init__(self, host: str) -> None:
        self._server = _Server((host, 0), _Handler)
        self._server.owner = self
        self.host = f"{host}:{self._server.server_address[1]}"
        self.url = f"{self.scheme}://{self.host}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True,
                                        name=f"{type(self).__name__}-{self.host}")
        self._thread.start()
        self._stopped = False

    def _handle(self, h: _Handler) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _errors(code: str, message: str) -> bytes:
    return _dumps({"errors": [{"code": code, "message": message}]})


# --- token server ------------------------------------------------------------------------

#: Decides the actions granted: (user or None for anonymous, type, name, actions asked).
Grant = Callable[[str | None, str, str, list[str]], list[str]]


class TokenServer(_HttpService):
    """A Docker token server (distribution's ``docs/spec/auth/token.md``) on 127.0.0.1.

    ``GET /token?service=S&scope=repository:NAME:pull[,push]`` (``scope`` repeated, or none),
    Basic credentials checked against ``users`` (wrong ones: 401). Authenticated users get
    every action they ask for; anonymous requests get a token with no access unless
    ``anonymous_pull`` (then ``pull`` only). ``grant`` overrides both. Also answers the OAuth2
    form (``POST /token``, grant_type=password, username, password, scope space-separated).

    The reply holds the names in ``fields`` (``token`` and ``access_token`` by default),
    ``expires_in`` (left out when None; the JWT then expires in 60 s) and ``issued_at``.
    ``requests`` lists (path+query, Authorization header or None) of every request (a POST's
    form is appended as a query), ``tokens`` the tokens issued.
    """

    def __init__(self, users: Mapping[str, str] | None = None, *, anonymous_pull: bool = False,
                 expires_in: int | None = 60, service: str = "ember-registry",
                 issuer: str = "ember-token-server", grant: Grant | None = None,
                 fields: Sequence[str] = ("token", "access_token")) -> None:
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.service = service
        self.issuer = issuer
        self.grant = grant
        self.fields = tuple(fields)
        self.requests: list[tuple[str, str | None]] = []
        self.tokens: list[str] = []
        ca, self._signer = _token_pki()
        #: PEM of the CA the registry must trust (its ``rootcertbundle``).
        self.ca_pem = ca.cert_pem
        super().__init__("127.0.0.1")
        self.realm = f"{self.url}/token"

    def mint(self, subject: str | None, access: Sequence[Mapping[str, Any]],
             *, expires_in: int | None = None, audience: str | None = None,
             issuer: str | None = None) -> str:
        """A signed token for ``access`` ([{type, name, actions}]), without any request."""
        now = int(time.time())
        ttl = expires_in if expires_in is not None else (self.expires_in or 60)
        claims = {
            "iss": issuer or self.issuer, "sub": subject or "", "aud": audience or self.service,
            "exp": now + ttl, "nbf": now - 1, "iat": now, "jti": uuid.uuid4().hex,
            "access": [dict(a) for a in access],
        }
        x5c = base64.b64encode(self._signer.cert.public_bytes(serialization.Encoding.DER))
        return jwt.encode(claims, self._signer.key, algorithm="RS256",
                          headers={"typ": "JWT", "x5c": [x5c.decode()]})

    def _access(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3:
                continue
            typ, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1].split(",")
            if self.grant is not None:
                granted = self.grant(user, typ, name, actions)
            elif user is not None:
                granted = actions
            else:
                granted = [a for a in actions if a == "pull"] if self.anonymous_pull else []
            if granted:
                access.append({"type": typ, "name": name, "actions": list(granted)})
        return access

    def _handle(self, h: _Handler) -> None:
        auth = h.headers.get("Authorization")
        path = h.path
        url = urlsplit(h.path)
        if h.command == "POST":
            form = h._body().decode()
            path = f"{url.path}?{form}"
            q = parse_qs(form)
            user, password = q.get("username", [None])[0], q.get("password", [None])[0]
            scopes = " ".join(q.get("scope", [])).split()
            service = q.get("service", [None])[0]
        else:
            q = parse_qs(url.query)
            scopes = q.get("scope", [])
            service = q.get("service", [None])[0]
            user = password = None
            if auth and auth.lower().startswith("basic "):
                try:
                    user, _, password = (base64.b64decode(auth[6:].strip())
                                         .decode().partition(":"))
                except (ValueError, UnicodeDecodeError):
                    user, password = "", None
        self.requests.append((path, auth))
        if url.path != "/token" or h.command not in ("GET", "POST"):
            h._reply(404, _errors("NOT_FOUND", "no such endpoint"))
            return
        if service is not None and service != self.service:
            h._reply(400, _errors("INVALID_REQUEST", f"unknown service {service!r}"))
            return
        if user is not None and self.users.get(user) != password:
            h._reply(401, _errors("UNAUTHORIZED", "wrong username or password"),
                     {"WWW-Authenticate": 'Basic realm="ember-token-server"'})
            return
        token = self.mint(user, self._access(user, scopes))
        self.tokens.append(token)
        reply: dict[str, Any] = {k: token for k in self.fields}
        if self.expires_in is not None:
            reply["expires_in"] = self.expires_in
        reply["issued_at"] = datetime.datetime.now(datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        h._reply(200, _dumps(reply))


# --- recording server (a redirect target) ------------------------------------------------


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


def _range_reply(h: _Handler, data: bytes, headers: Mapping[str, str]) -> None:
    """Serve ``data`` honouring a ``Range: bytes=N-[M]`` header (206), else 200."""
    m = _RANGE.match(h.headers.get("Range", "").strip())
    if m:
        start = int(m.group(1))
        end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
        if start >= len(data):
            h._reply(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            return
        h._reply(206, data[start:end + 1],
                 {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"},
                 content_type="application/octet-stream")
        return
    h._reply(200, data, headers, content_type="application/octet-stream")


class RecordingServer(_HttpService):
    """A plain HTTP server on 127.0.0.2 (another host than the registry's) serving blobs by
    the sha256 hex found in the request path (``Range`` honoured), recording every request.

    Blobs come from :meth:`add` or from the storage of registries given to
    :meth:`serve_registry` (a registry started with ``redirect_to=rec.url`` redirects blob GETs
    to ``rec.url + <storage path of the blob>``). ``requests``: (method, path, headers with
    lowercased names).
    """

    def __init__(self, host: str = "127.0.0.2") -> None:
        self.blobs: dict[str, bytes] = {}
        self.registries: list[Registry] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        super().__init__(host)

    def add(self, data: bytes) -> str:
        digest = sha256_digest(data)
        self.blobs[digest] = data
        return digest

    def serve_registry(self, registry: Registry) -> None:
        self.registries.append(registry)

    def _find(self, path: str) -> bytes | None:
        for hexpart in reversed(re.findall(r"[0-9a-f]{64}", path)):
            digest = f"sha256:{hexpart}"
            if digest in self.blobs:
                return self.blobs[digest]
            for reg in self.registries:
                p = reg.blob_path(digest)
                if p.is_file():
                    return p.read_bytes()
        return None

    def _handle(self, h: _Handler) -> None:
        self.requests.append((h.command, h.path, h._headers_dict()))
        data = self._find(urlsplit(h.path).path) if h.command in ("GET", "HEAD") else None
        if data is None:
            h._reply(404, _errors("BLOB_UNKNOWN", "no such blob"))
            return
        _range_reply(h, data, {"Accept-Ranges": "bytes", "ETag": f'"{sha256_digest(data)}"'})


# --- fault proxy -------------------------------------------------------------------------


@dataclass
class _Rule:
    kind: str  # cut, throttle, fail, ignore_range
    match: Callable[[str, str], bool]  # (method, path) -> applies
    times: int | None  # None: forever
    args: dict[str, Any] = field(default_factory=dict)


_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade"}


class FaultProxy(_HttpService):
    """A plain HTTP reverse proxy on 127.0.0.1 in front of a plain-HTTP registry (a
    :class:`Registry` or a base URL), making the faults a real registry does not.

    Each rule applies to the next matching request only, or to ``times`` of them (None:
    every one). ``requests``: (method, path with query, headers with lowercased names) of
    every request, before the rules. Bodies are buffered (fine for test images); chunked
    request bodies are not supported, so push to the registry itself, not through the proxy.
    """

    def __init__(self, upstream: Registry | str) -> None:
        base = upstream if isinstance(upstream, str) else upstream.url
        u = urlsplit(base)
        if u.scheme != "http" or u.hostname is None or u.port is None:
            raise ValueError(f"FaultProxy needs a plain http://host:port upstream, not {base!r}")
        self.upstream = base
        self._up = (u.hostname, u.port)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        super().__init__("127.0.0.1")

    # rules -------------------------------------------------------------

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    @staticmethod
    def _blob_match(digest: str) -> Callable[[str, str], bool]:
        _hex(digest)
        return lambda method, path: (method == "GET"
                                     and urlsplit(path).path.endswith(f"/blobs/{digest}"))

    def cut_blob(self, digest: str, after: int, times: int = 1) -> None:
        """Send a blob GET's status and headers (the full Content-Length) and ``after`` body
        bytes, then close the connection. Applies to ranged GETs too (``after`` bytes of the
        partial body)."""
        self._add(_Rule("cut", self._blob_match(digest), times, {"after": after}))

    def throttle(self, path_substring: str, retry_after: str | None = "1",
                 times: int = 1) -> None:
        """Answer 429 TOOMANYREQUESTS with ``Retry-After: retry_after`` (None: no header) to
        requests whose path (with query) contains ``path_substring``; upstream not asked."""
        self._add(_Rule("throttle", lambda m, p: path_substring in p, times,
                        {"retry_after": retry_after}))

    def fail(self, path_substring: str, status: int = 503, times: int = 1) -> None:
        """Answer ``status`` (a registry-style JSON error) without asking upstream."""
        self._add(_Rule("fail", lambda m, p: path_substring in p, times, {"status": status}))

    def ignore_range(self, digest: str, times: int | None = None) -> None:
        """Drop ``Range`` from blob GETs of ``digest`` (every one unless ``times``): the answer
        is 200 with the whole body."""
        self._add(_Rule("ignore_range", self._blob_match(digest), times))

    def clear(self) -> None:
        """Forget every rule (and the requests seen)."""
        with self._lock:
            self._rules.clear()
            self.requests.clear()

    def _take(self, kinds: tuple[str, ...], method: str, path: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.kind in kinds and rule.times != 0 and rule.match(method, path):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule
        return None

    # serving -----------------------------------------------------------

    def _handle(self, h: _Handler) -> None:
        method, path = h.command, h.path
        headers = h._headers_dict()
        self.requests.append((method, path, headers))
        body = h._body()
        action = self._take(("cut", "throttle", "fail"), method, path)
        if action is not None and action.kind == "throttle":
            extra = ({"Retry-After": action.args["retry_after"]}
                     if action.args["retry_after"] is not None else {})
            h._reply(429, _errors("TOOMANYREQUESTS", "slow down (FaultProxy)"), extra)
            return
        if action is not None and action.kind == "fail":
            status = action.args["status"]
            h._reply(status, _errors("UNAVAILABLE", f"injected {status} (FaultProxy)"))
            return
        fwd = {k: v for k, v in headers.items() if k.lower() not in _HOP}
        if self._take(("ignore_range",), method, path) is not None:
            fwd = {k: v for k, v in fwd.items() if k.lower() not in ("range", "if-range")}
        conn = http.client.HTTPConnection(*self._up, timeout=30)
        try:
            conn.request(method, path, body=body or None, headers=fwd)
            resp = conn.getresponse()
            data = resp.read()
            resp_headers = resp.getheaders()
        finally:
            conn.close()
        h.send_response(resp.status, resp.reason)
        for k, v in resp_headers:
            if k.lower() in _HOP or (k.lower() == "content-length" and method != "HEAD"):
                continue
            h.send_header(k, v)
        if method != "HEAD":
            h.send_header("Content-Length", str(len(data)))
        if action is not None:  # cut
            h.send_header("Connection", "close")
        h.end_headers()
        if method == "HEAD":
            return
        if action is not None:
            h.wfile.write(data[:action.args["after"]])
            h.wfile.flush()
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(data)


# --- the registry ------------------------------------------------------------------------


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def _split_ref(ref: str) -> tuple[str, str]:
    """``name:tag`` or ``name@digest`` -> (name, tag or digest)."""
    if "@" in ref:
        name, _, reference = ref.partition("@")
        return name, reference
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, "latest"
    return name, tag


def _clean_env() -> dict[str, str]:
    """The environment for child processes: no REGISTRY_* overrides, no proxies."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("REGISTRY_") and "proxy" not in k.lower()}
    env["NO_PROXY"] = env["no_proxy"] = "*"
    return env


_LIVE: weakref.WeakSet[Registry] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    """A safety net: no registry outlives the interpreter that started it."""
    for reg in list(_LIVE):
        reg.stop()


class Registry:
    """A real docker-registry 2.8 process on 127.0.0.1:<free port>, in its own temp dir.
    Made by :func:`start_registry`.

    Attributes: ``url`` (http[s]://127.0.0.1:PORT), ``host`` (127.0.0.1:PORT), ``ca`` (the CA
    PEM that signed its TLS certificate, or None), ``users`` (username -> password for
    htpasswd or token mode; empty when anonymous), ``auth`` (None, "htpasswd", "token"),
    ``token_server`` (token mode), ``dir`` (its temp dir), ``storage`` (the filesystem
    driver's root), ``log`` (its output), ``config`` (the configuration it runs with).
    """

    def __init__(self, dir: Path, config: dict[str, Any], *, port: int, tls: bool,
                 auth: str | None, users: Mapping[str, str],
                 token_server: TokenServer | None, owns_token_server: bool) -> None:
        self.dir = dir
        self.config = config
        self.host = f"127.0.0.1:{port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.ca: Path | None = dir / "ca.pem" if tls else None
        self.auth = auth
        self.users = dict(users)
        self.token_server = token_server
        self._owns_token_server = owns_token_server
        self.storage = dir / "data"
        self.log = dir / "registry.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # lifecycle ---------------------------------------------------------

    def _start(self) -> None:
        cfg_path = self.dir / "config.yml"
        cfg_path.write_text(json.dumps(self.config, indent=1))  # JSON is YAML
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg_path)], cwd=self.dir,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=_clean_env(),
                                         start_new_session=True)
        _LIVE.add(self)
        deadline = time.monotonic() + 10
        with self.http(auth=False, timeout=1) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RegistryStartError(f"docker-registry exited ({self.proc.returncode})",
                                             self.log_tail())
                try:
                    c.get("/v2/")
                    return
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        self._kill()
                        raise RegistryStartError("docker-registry did not answer GET /v2/ "
                                                 "within 10 s", self.log_tail()) from None
                    time.sleep(0.05)

    def stop(self) -> None:
        """Stop the process (and the token server it started). Idempotent."""
        self._kill()
        if self._owns_token_server and self.token_server is not None:
            self.token_server.stop()

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # storage -----------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """The blob's data file in the filesystem storage (tests corrupt or delete it)."""
        hexpart = _hex(digest)
        return (self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexpart[:2]
                / hexpart / "data")

    # HTTP for fixtures (not what the tests test) -----------------------

    def credentials(self) -> tuple[str, str] | None:
        """The first user's (name, password), or None when anonymous."""
        return next(iter(self.users.items()), None) if self.auth else None

    def http(self, *, auth: bool = True, timeout: float = 30) -> httpx.Client:
        """An httpx client on ``url`` trusting ``ca``, with Basic credentials of the first
        user in htpasswd mode (``auth=False``: none). Token mode: see :meth:`bearer`."""
        creds = self.credentials() if auth and self.auth == "htpasswd" else None
        return httpx.Client(base_url=self.url, verify=ssl_context(self.ca), trust_env=False,
                            timeout=timeout, auth=creds)

    def bearer(self, name: str, actions: Sequence[str] = ("pull",)) -> dict[str, str]:
        """Token mode: an Authorization header for repository ``name``, minted directly (no
        request reaches the token server, so its ``requests`` stay the tests' own)."""
        assert self.token_server is not None, "not a token registry"
        user = self.credentials()
        token = self.token_server.mint(user[0] if user else None,
                                       [{"type": "repository", "name": name,
                                         "actions": list(actions)}])
        return {"Authorization": f"Bearer {token}"}

    def _auth_headers(self, name: str, actions: Sequence[str]) -> dict[str, str]:
        return self.bearer(name, actions) if self.auth == "token" else {}

    def manifest_digest(self, ref: str, accept: str = MANIFEST_ACCEPT) -> str:
        """``Docker-Content-Digest`` of a HEAD on the manifest ``name:tag``/``name@digest``."""
        name, reference = _split_ref(ref)
        with self.http() as c:
            r = c.head(f"/v2/{name}/manifests/{reference}",
                       headers={"Accept": accept, **self._auth_headers(name, ["pull"])})
            r.raise_for_status()
            return r.headers["Docker-Content-Digest"]

    def upload_blob(self, name: str, data: bytes) -> str:
        """Monolithic upload (POST then PUT ?digest=) of raw bytes: a blob exactly as given."""
        digest = sha256_digest(data)
        hdrs = self._auth_headers(name, ["pull", "push"])
        with self.http() as c:
            r = c.post(f"/v2/{name}/blobs/uploads/", headers=hdrs)
            r.raise_for_status()
            loc = r.headers["Location"]
            sep = "&" if "?" in loc else "?"
            r = c.put(f"{loc}{sep}digest={digest}", content=data,
                      headers={**hdrs, "Content-Type": "application/octet-stream"})
            r.raise_for_status()
        return digest

    def put_manifest(self, ref: str, body: bytes, media_type: str = OCI_MANIFEST) -> str:
        """PUT ``body`` as manifest ``name:tag``/``name@digest`` with Content-Type
        ``media_type`` (whatever it says: tests make odd ones); returns the served digest."""
        name, reference = _split_ref(ref)
        with self.http() as c:
            r = c.put(f"/v2/{name}/manifests/{reference}", content=body,
                      headers={**self._auth_headers(name, ["pull", "push"]),
                               "Content-Type": media_type})
            r.raise_for_status()
            return r.headers.get("Docker-Content-Digest") or sha256_digest(body)

    def has_blob(self, name: str, digest: str) -> bool:
        with self.http() as c:
            r = c.head(f"/v2/{name}/blobs/{digest}", headers=self._auth_headers(name, ["pull"]))
            return r.status_code == 200

    def push_layout(self, layout: Path, ref: str) -> str:
        """Push an OCI layout's image byte for byte over HTTP (no skopeo: uncompressed
        layers stay uncompressed, odd media types stay odd): blobs, then child manifests
        by digest, then the top manifest or index as ``ref``. Returns its digest."""
        name, tag = _split_ref(ref)

        def put(desc: Mapping[str, Any], reference: str) -> str:
            body = layout_blob(layout, desc["digest"])
            doc = json.loads(body)
            if "manifests" in doc:
                for child in doc["manifests"]:
                    put(child, child["digest"])
            else:
                for blob in [doc["config"], *doc.get("layers", [])]:
                    if not self.has_blob(name, blob["digest"]):
                        self.upload_blob(name, layout_blob(layout, blob["digest"]))
            return self.put_manifest(f"{name}:{reference}" if ":" not in reference
                                     else f"{name}@{reference}", body,
                                     doc.get("mediaType") or desc["mediaType"])

        top = json.loads((layout / "index.json").read_bytes())["manifests"][0]
        put(top, tag)
        return self.manifest_digest(f"{name}:{tag}")

    def push(self, layout: Path, ref: str, *, format: str = "oci", all: bool = True) -> str:
        """``skopeo copy oci:LAYOUT docker://HOST/ref`` (``format`` "oci" keeps the layout's
        bytes and digests; "v2s2" converts to Docker schema2 / manifest list, new digests, no
        zstd, no attestation manifests); ``all`` copies every image of an index. Returns the
        manifest digest the registry serves for ``ref`` (HEAD accepting every manifest type).

        skopeo gzips uncompressed layers on the way to a registry, so with ``format="oci"``
        a layout holding one is pushed by :meth:`push_layout` instead (same bytes as the
        layout; ``all`` is then implied)."""
        if format not in ("oci", "v2s2"):
            raise ValueError(f"format must be oci or v2s2, not {format!r}")
        if format == "oci" and _has_uncompressed_layer(layout):
            return self.push_layout(layout, ref)
        name, tag = _split_ref(ref)
        cmd = [SKOPEO_BIN, "--insecure-policy", "copy", "--quiet", "--retry-times", "0",
               "--format", format]
        if all:
            cmd.append("--all")
        if self.ca is not None:
            certs = self.dir / "skopeo-certs"
            certs.mkdir(exist_ok=True)
            shutil.copyfile(self.ca, certs / "ca.crt")
            cmd += ["--dest-cert-dir", str(certs)]
        else:
            cmd.append("--dest-tls-verify=false")
        creds = self.credentials()
        cmd += ["--dest-creds", f"{creds[0]}:{creds[1]}"] if creds else ["--dest-no-creds"]
        cmd += [f"oci:{layout}", f"docker://{self.host}/{name}:{tag}"]
        seen = len(self.token_server.requests) if self.token_server else 0
        env = {**_clean_env(), "REGISTRY_AUTH_FILE": str(self.dir / "auth.json")}
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120,
                                 stdin=subprocess.DEVNULL)
        finally:
            if self.token_server is not None:  # skopeo's token requests are not the tests'
                del self.token_server.requests[seen:]
        if out.returncode != 0:
            raise RuntimeError(f"skopeo copy to {self.host}/{name}:{tag} failed: "
                               f"{out.stderr.strip()}\nregistry log:\n{self.log_tail(10)}")
        return self.manifest_digest(f"{name}:{tag}")


def _has_uncompressed_layer(layout: Path) -> bool:
    def walk(digest: str) -> bool:
        doc = layout_doc(layout, digest)
        if "manifests" in doc:
            return any(walk(m["digest"]) for m in doc["manifests"])
        return any(layer.get("mediaType") == LAYER_TAR for layer in doc.get("layers", []))

    return walk(layout_digest(layout))


class RegistryStartError(RuntimeError):
    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(f"{message}; log tail:\n{log_tail}")
        self.log_tail = log_tail


def _write_htpasswd(path: Path, users: Mapping[str, str]) -> None:
    lines = [f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}"
             for u, p in users.items()]
    path.write_text("\n".join(lines) + "\n")


def start_registry(tmp: Path, *, tls: bool = False, auth: str | None = None,
                   redirect_to: str | None = None, users: Mapping[str, str] | None = None,
                   token_server: TokenServer | None = None,
                   config: Mapping[str, Any] | None = None) -> Registry:
    """Start docker-registry 2.8 on 127.0.0.1:<free port> with its files in ``tmp``.

    Args:
        tls: serve HTTPS with a certificate (SAN IP:127.0.0.1, DNS:localhost) signed by
            ``Registry.ca``.
        auth: None (anonymous), ``"htpasswd"`` (Basic, bcrypt; Debian's 2.8.2 accepts it over
            plain HTTP too, so a :class:`FaultProxy` can front it) or ``"token"``
            (Bearer from a :class:`TokenServer`: ``token_server`` if given (the caller stops
            it), else one started for ``users`` and stopped with the registry).
        redirect_to: base URL (``http://host:port``) of the storage ``redirect`` middleware:
            blob GETs answer 307 to ``redirect_to + <storage path>`` (see
            :class:`RecordingServer`).
        users: username -> password (default :data:`DEFAULT_USERS`); with a ``token_server``
            its own users.
        config: merged into the generated configuration (e.g. ``{"proxy": {"remoteurl": u}}``
            for a pull-through mirror).

    Waits until ``GET /v2/`` answers; raises :class:`RegistryStartError` with the log tail if
    it does not within 10 s.
    """
    if auth not in (None, "htpasswd", "token"):
        raise ValueError(f"auth must be None, 'htpasswd' or 'token', not {auth!r}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "data").mkdir(exist_ok=True)
    cfg: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(tmp / "data")},
                    "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": {"addr": "", "secret": secrets.token_hex(16),
                 "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    if tls:
        ca, server = _tls_pki()
        (tmp / "ca.pem").write_bytes(ca.cert_pem)
        (tmp / "cert.pem").write_bytes(server.cert_pem)
        (tmp / "key.pem").write_bytes(server.key_pem)
        cfg["http"]["tls"] = {"certificate": str(tmp / "cert.pem"), "key": str(tmp / "key.pem")}
    owns = False
    if auth == "htpasswd":
        users = dict(DEFAULT_USERS if users is None else users)
        _write_htpasswd(tmp / "htpasswd", users)
        cfg["auth"] = {"htpasswd": {"realm": "ember-test", "path": str(tmp / "htpasswd")}}
    elif auth == "token":
        if token_server is None:
            token_server, owns = TokenServer(users), True
        users = token_server.users
        (tmp / "token-ca.pem").write_bytes(token_server.ca_pem)
        cfg["auth"] = {"token": {"realm": token_server.realm, "service": token_server.service,
                                 "issuer": token_server.issuer,
                                 "rootcertbundle": str(tmp / "token-ca.pem")}}
    else:
        users = {}
    if redirect_to is not None:
        cfg["middleware"] = {"storage": [{"name": "redirect",
                                          "options": {"baseurl": redirect_to}}]}
    if config:
        _deep_merge(cfg, config)
    last: Exception | None = None
    for _ in range(3):  # a free port can be taken between the probe and the bind
        port = free_port()
        cfg["http"]["addr"] = f"127.0.0.1:{port}"
        reg = Registry(tmp, cfg, port=port, tls=tls, auth=auth, users=users,
                       token_server=token_server, owns_token_server=owns)
        try:
            reg._start()
            return reg
        except RegistryStartError as e:
            reg._kill()
            last = e
            if "address already in use" not in e.log_tail:
                break
    if owns and token_server is not None:
        token_server.stop()
    assert last is not None
    raise last


@contextlib.contextmanager
def running_registry(tmp: Path, **kwargs: Any) -> Iterator[Registry]:
    """:func:`start_registry` as a context manager (for fixtures: ``with ... as reg: yield``)."""
    reg = start_registry(tmp, **kwargs)
    try:
        yield reg
    finally:
        reg.stop()
