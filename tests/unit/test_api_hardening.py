"""The daemon's hardening, without a VM: TLS or an explicit --insecure-tcp for TCP, bounded
request bodies (413), bounded open streams per TCP client (429), the token file followed
live and rotated by ``ember token rotate``.

Real daemons (``python -m ember serve`` in a data dir of their own) and a real uvicorn in
this process; every address is 127.0.0.1 or a Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import err, sample_manager
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient

import ember
from ember.api.app import create_app
from ember.api.limits import JSON_BODY, BodyLimit, StreamLimit
from ember.cli import main
from ember.daemon.manager import Manager
from ember.daemon.server import Token, TokenAuth, check_tcp_flags, rotate_token, tcp_token
from ember.errors import EmberError
from ember.sdk import DaemonUnavailable, ExecSession, NotFound
from ember.sdk import daemon as sdk_daemon

#: Seconds a daemon gets to come up; generous for a loaded two-core host.
UP = 60.0




# ------------------------------------------------------------------ certificates


@dataclass
class Certs:
    ca: Path        # the CA's certificate: what clients trust
    other_ca: Path  # a CA that did not sign the daemon's certificate
    cert: Path      # the daemon's, for 127.0.0.1, signed by ca
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("tls")
    ca_key, ca = _ca("ember test CA")
    _, other = _ca("someone else's CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out = Certs(d / "ca.pem", d / "other-ca.pem", d / "cert.pem", d / "key.pem")
    out.ca.write_bytes(_pem(ca))
    out.other_ca.write_bytes(_pem(other))
    out.cert.write_bytes(_pem(cert))
    out.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    out.key.chmod(0o600)
    return out


# ------------------------------------------------------------------ real daemons


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("EMBER_HOST", "EMBER_TOKEN", "EMBER_TLS_CA")}
    return {**env, "EMBER_HOME": str(home), "EMBER_ACCEL": "tcg", **extra}


class Daemon:
    """``python -m ember serve ARGS`` on ``home``, up once it says where it listens."""

    def __init__(self, home: Path, *args: str, **env: str) -> None:
        self.home = home
        self.socket = home / "ember.sock"
        self.stderr = home / "serve.stderr"
        with open(self.stderr, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ember", "serve", *args],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         env=clean_env(home, **env), start_new_session=True)
        deadline = time.monotonic() + UP
        while not (m := re.search(r"listening on \S+ and (https?://127\.0\.0\.1:\d+) ",
                                  self.err())):
            assert self.proc.poll() is None, f"ember serve exited: {self.err()}"
            assert time.monotonic() < deadline, f"ember serve did not start: {self.err()}"
            time.sleep(0.05)
        self.url = m.group(1)

    def err(self) -> str:
        return self.stderr.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(UP)


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[Daemon]:
    """A daemon with TLS on a port of its choosing; its token is its data dir's file."""
    d = Daemon(tmp_path_factory.mktemp("d"), "--tcp", "127.0.0.1:0",
               "--tls-cert", str(certs.cert), "--tls-key", str(certs.key))
    try:
        yield d
    finally:
        d.stop()


def file_token(d: Daemon) -> str:
    return (d.home / "token").read_text().strip()


# ------------------------------------------------------------------ TLS or --insecure-tcp


@pytest.mark.parametrize(("flags", "message"), [
    (["--tcp", "127.0.0.1:0"], "--tcp needs TLS: give --tls-cert FILE --tls-key FILE, or "
     "--insecure-tcp to serve plain HTTP"),
    (["--tcp", "0.0.0.0:7777"], "--tcp needs TLS"),
    (["--tcp", "127.0.0.1:7777", "--tls-cert", "c.pem"], "--tls-cert and --tls-key go "
     "together: give both"),
    (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "--tls-cert and --tls-key are for the "
     "TCP listener: add --tcp HOST:PORT"),
    (["--insecure-tcp"], "--insecure-tcp is for the TCP listener"),
    (["--tcp", "127.0.0.1:0", "--insecure-tcp", "--tls-cert", "c", "--tls-key", "k"],
     "--insecure-tcp and --tls-cert/--tls-key exclude each other"),
])
def test_tcp_without_tls_or_insecure_tcp_is_refused_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        flags: list[str], message: str) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    assert main(["serve", *flags]) == 125
    out, errors = capsys.readouterr()
    assert out == ""
    (line,) = errors.splitlines()  # one line, before anything is locked or bound
    assert line.startswith(f"ember: error: {message}")
    assert not (tmp_path / "daemon.pid").exists() and not (tmp_path / "ember.sock").exists()


def test_loopback_is_no_exception_and_the_flags_are_checked_without_an_address() -> None:
    for spec in ("127.0.0.1:7777", "127.8.9.10:1", "localhost:7777", ":7777"):
        with pytest.raises(EmberError, match="--tcp needs TLS"):
            check_tcp_flags(spec, None, None, False)
        assert check_tcp_flags(spec, None, None, True) is False
        assert check_tcp_flags(spec, "c.pem", "k.pem", False) is True
    assert check_tcp_flags(None, None, None, False) is False


def test_unusable_tls_files_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str],
                                         certs: Certs) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    for cert, key, why in [(tmp_path / "none.pem", certs.key, "No such file or directory"),
                           (certs.key, certs.cert, "not PEM"),
                           (certs.ca, certs.key, "key values mismatch")]:
        assert main(["serve", "--tcp", "127.0.0.1:0", "--tls-cert", str(cert),
                     "--tls-key", str(key)]) == 125
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("ember: error: ") and why in line, line
    assert not (tmp_path / "ember.sock").exists()


def test_insecure_tcp_serves_plain_http_and_says_so(tmp_path_factory: pytest.TempPathFactory
                                                    ) -> None:
    d = Daemon(tmp_path_factory.mktemp("d"), "--tcp", "127.0.0.1:0", "--insecure-tcp",
               EMBER_TOKEN="plain-secret")
    try:
        assert d.url.startswith("http://127.0.0.1:")
        warnings = [ln for ln in d.err().splitlines() if "--insecure-tcp" in ln]
        assert len(warnings) == 1 and "WARNING" in warnings[0] and warnings[0].endswith(
            f"--insecure-tcp: {d.url} is plain HTTP, without TLS: the bearer token and all "
            "traffic cross the network unencrypted")
        assert "plain-secret" not in d.err()
        r = httpx.get(f"{d.url}/v1/version", headers={"Authorization": "Bearer plain-secret"})
        assert r.status_code == 200 and r.json()["api"] == "v1"
        assert httpx.get(f"{d.url}/v1/version").status_code == 401
        with ember.Client(base_url=d.url, token="plain-secret") as c:
            assert c.version().api == "v1"
    finally:
        d.stop()


def test_tls_serving_verified_by_the_sdk_against_the_ca(tls_daemon: Daemon, certs: Certs,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    d = tls_daemon
    token = file_token(d)
    assert d.url.startswith("https://127.0.0.1:")
    assert f"and {d.url} (bearer token from {d.home / 'token'} (created))" in d.err()
    assert "--insecure-tcp" not in d.err()
    for var in ("EMBER_HOST", "EMBER_TOKEN", "EMBER_TLS_CA"):
        monkeypatch.delenv(var, raising=False)

    with ember.Client(base_url=d.url, token=token, ca=certs.ca) as c:
        assert c.version().api == "v1"
        with pytest.raises(NotFound, match="no machine named 'ghost'"):
            c.machines.get("ghost")
        # the exec WebSocket goes over wss://, verified the same way
        session = ExecSession.open(c.endpoint, "/v1/machines/ghost/exec/ws",
                                         {"cmd": ["true"]}, ssl_context=c._ssl)
        with session:
            events = list(session)
        assert [(e.type, e.message) for e in events] == [("error", "no machine named 'ghost'")]
    # the CA from the environment, and EMBER_HOST: as the CLI's users give them
    monkeypatch.setenv("EMBER_HOST", d.url)
    monkeypatch.setenv("EMBER_TOKEN", token)
    monkeypatch.setenv("EMBER_TLS_CA", str(certs.ca))
    with ember.Client() as c:
        assert c.endpoint.ca == certs.ca and c.version().api == "v1"

    async def aio() -> str:
        async with ember.AsyncClient() as ac:
            return (await ac.version()).api
    assert asyncio.run(aio()) == "v1"

    # Verifying by default: the system's CAs, or the wrong CA, do not know this certificate.
    monkeypatch.delenv("EMBER_TLS_CA")
    for ca in (None, certs.other_ca):
        with ember.Client(ca=ca) as c, pytest.raises(DaemonUnavailable) as failed:
            c.version()
        assert "CERTIFICATE_VERIFY_FAILED" in str(failed.value)
        assert "set EMBER_TLS_CA" in str(failed.value)
    with pytest.raises(EmberError, match="cannot use the CA file"):
        ember.Client(ca=d.home / "no-such-ca.pem")
    with pytest.raises(ValueError, match="ca is for an https:// daemon"):
        ember.Client(base_url="http://127.0.0.1:1", ca=certs.ca)
    # No plain HTTP on the TLS port; the Unix socket stays plain HTTP.
    with pytest.raises(httpx.HTTPError):
        httpx.get(d.url.replace("https://", "http://") + "/v1/version",
                  headers={"Authorization": f"Bearer {token}"})
    assert sdk_daemon.answers(d.socket)


def test_the_cli_talks_to_a_tls_daemon(tls_daemon: Daemon, certs: Certs) -> None:
    d = tls_daemon
    env = clean_env(d.home.parent / "elsewhere", EMBER_HOST=d.url, EMBER_TOKEN=file_token(d))

    def cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ember", *args], capture_output=True,
                              text=True, timeout=UP, env={**env, **extra},
                              stdin=subprocess.DEVNULL)

    r = cli("version", "--json", EMBER_TLS_CA=str(certs.ca))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["daemon"]["address"] == d.url
    r = cli("ps", EMBER_TLS_CA=str(certs.ca))  # the CLI's lean path (http.client)
    assert r.returncode == 0, r.stderr
    r = cli("ps", EMBER_TLS_CA=str(certs.other_ca))
    assert r.returncode == 125
    (line,) = r.stderr.splitlines()
    assert "CERTIFICATE_VERIFY_FAILED" in line and "set EMBER_TLS_CA" in line


# ------------------------------------------------------------------ the token


def test_token_rotate_takes_effect_at_once(tls_daemon: Daemon, certs: Certs,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    d = tls_daemon
    path = d.home / "token"
    old = file_token(d)
    monkeypatch.setenv("EMBER_HOME", str(d.home))
    monkeypatch.delenv("EMBER_TOKEN", raising=False)

    def status(token: str) -> int:
        with httpx.Client(verify=ssl.create_default_context(cafile=certs.ca)) as h:
            return h.get(f"{d.url}/v1/version",
                         headers={"Authorization": f"Bearer {token}"}).status_code

    assert status(old) == 200
    assert main(["token", "rotate"]) == 0
    out, errors = capsys.readouterr()
    new = file_token(d)
    assert out == "" and new != old and len(new) >= 32
    assert new not in errors and f"wrote a new bearer token to {path} (mode 0600)" in errors
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in d.home.iterdir() if p.name.startswith(".token")] == []
    assert status(old) == 401 and status(new) == 200  # no restart

    assert main(["token", "rotate", "--show"]) == 0
    out, _ = capsys.readouterr()
    assert out == file_token(d) + "\n" and out.strip() != new
    assert status(new) == 401 and status(out.strip()) == 200
    assert new not in d.err() and out.strip() not in d.err()


def test_the_token_file_is_followed_and_a_fixed_token_is_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    monkeypatch.delenv("EMBER_TOKEN", raising=False)
    token, source = tcp_token()
    assert source == f"{tmp_path / 'token'} (created)"
    assert token.expected() == f"Bearer {(tmp_path / 'token').read_text().strip()}".encode()
    path, value = rotate_token()
    assert token.expected() == f"Bearer {value}".encode()
    path.write_text("")                    # emptied: nobody gets in
    assert token.expected() is None
    path.unlink()                          # gone: nobody either
    assert token.expected() is None
    path.write_text("  hand-made \n")      # back
    assert token.expected() == b"Bearer hand-made"
    fixed, source = tcp_token("given")
    assert source == "--token"
    rotate_token()
    assert fixed.expected() == b"Bearer given"
    monkeypatch.setenv("EMBER_TOKEN", "from-env")
    env_token, source = tcp_token()
    rotate_token()
    assert source == "$EMBER_TOKEN" and env_token.expected() == b"Bearer from-env"


def test_token_auth_follows_the_file_in_constant_time(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one\n")
    statuses: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        statuses.append(200)

    async def send(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            statuses.append(msg["status"])

    async def receive() -> dict[str, Any]:
        return {}

    auth = TokenAuth(app, Token("one", path))

    def call(token: str) -> int:
        scope = {"type": "http", "path": "/v1/version", "server": ("127.0.0.1", 7777),
                 "headers": [(b"authorization", f"Bearer {token}".encode())]}
        asyncio.run(auth(scope, receive, send))
        return statuses.pop()

    assert (call("one"), call("two")) == (200, 401)
    tmp = tmp_path / "new"
    tmp.write_text("two\n")
    tmp.replace(path)  # as rotate does: another inode
    assert (call("one"), call("two")) == (401, 200)
    path.unlink()
    assert (call("one"), call("two"), call("")) == (401, 401, 401)


# ------------------------------------------------------------------ bodies: 413


@pytest.fixture(scope="module")
def mgr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    with sample_manager(tmp_path_factory) as m:
        yield m


@pytest.fixture(scope="module")
def client(mgr: Manager) -> Iterator[TestClient]:
    with TestClient(create_app(mgr), raise_server_exceptions=False) as c:
        yield c


def test_a_declared_body_over_the_limit_is_413(client: TestClient) -> None:
    body = json.dumps({"image": "sample", "env": {"A": "x" * JSON_BODY}}).encode()
    r = client.post("/v1/machines", content=body, headers={"content-type": "application/json"})
    assert err(r, 413, "too_large") == ("the request body is larger than 1 MiB, the limit of "
                                        "this endpoint")
    assert r.headers["connection"] == "close"
    # Just under the limit goes through to the schema (422: no such field).
    body = json.dumps({"x": "y" * (JSON_BODY - 20)}).encode()
    assert len(body) <= JSON_BODY
    err(client.post("/v1/machines", content=body,
                    headers={"content-type": "application/json"}), 422, "invalid")


def test_larger_bodies_where_they_belong(client: TestClient) -> None:
    assert client.post("/v1/machines", json={"image": "sample", "name": "big"}
                       ).status_code == 201
    big = b"\0" * (3 * JSON_BODY)
    # an exec carries its stdin: past the JSON limit, to the route's own answer
    r = client.post("/v1/machines/idle-or-not/exec",
                    json={"cmd": ["cat"], "stdin": "x" * (3 * JSON_BODY)})
    err(r, 404, "not_found")
    # archives are streamed to a file: the route answers (no image in it, no such machine)
    r = client.post("/v1/images/upload", content=big,
                    headers={"content-type": "application/x-tar"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid", r.text
    r = client.put("/v1/machines/big/files", params={"path": "/tmp"}, content=big)
    assert "copying files into it" in err(r, 409, "conflict")  # spooled, then: not running


def _asgi(app: Any, scope: dict[str, Any], chunks: list[bytes]) -> list[dict[str, Any]]:
    """Run an ASGI app on one request whose body comes in ``chunks``; what it sent."""
    sent: list[dict[str, Any]] = []
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        if not pending:
            return {"type": "http.disconnect"}
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    asyncio.run(app(scope, receive, send))
    return sent


def test_the_limit_is_exact_and_counts_bodies_without_a_length() -> None:
    read: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        total = 0
        while True:
            msg = await receive()
            total += len(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        read.append(total)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limited = BodyLimit(app, lambda path: 1000)
    scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}
    sent = _asgi(limited, scope, [b"x" * 500, b"x" * 500])  # exactly the limit
    assert sent[0]["status"] == 204 and read == [1000]
    sent = _asgi(limited, scope, [b"x" * 500, b"x" * 500, b"x"])  # one byte more
    assert sent[0]["status"] == 413 and read == [1000]
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["code"] == "too_large"
    declared = {**scope, "headers": [(b"content-length", b"1001")]}
    sent = _asgi(limited, declared, [b"x" * 1001])
    assert sent[0]["status"] == 413 and read == [1000]  # refused before the app ran


# ------------------------------------------------------------------ a real uvicorn


@dataclass
class Live:
    url: str
    socket: Path
    per_client: int


@pytest.fixture(scope="module")
def live(mgr: Manager, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The API (streams limited to 2 per TCP client) on 127.0.0.1 and on a Unix socket,
    served by uvicorn on a thread of this process."""
    import uvicorn

    per_client = 2
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(64)
    path = tmp_path_factory.mktemp("sock") / "api.sock"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(path))
    unix.listen(64)
    config = uvicorn.Config(create_app(mgr, streams_per_client=per_client), lifespan="off",
                            log_level="warning", ws="websockets-sansio",
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[tcp, unix])),
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + UP
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{tcp.getsockname()[1]}", path, per_client)
    finally:
        server.should_exit = True
        thread.join(UP)
        tcp.close()
        unix.close()


def test_a_chunked_body_over_the_limit_is_cut_off_with_413(live: Live) -> None:
    def body(size: int) -> Iterator[bytes]:  # no length: sent chunked
        for i in range(0, size, 64 << 10):
            yield b"x" * min(64 << 10, size - i)

    r = httpx.post(f"{live.url}/v1/machines", content=body(JSON_BODY + 1),
                   headers={"content-type": "application/json"}, timeout=UP)
    assert "content-length" not in r.request.headers
    assert err(r, 413, "too_large").startswith("the request body is larger than 1 MiB")
    assert r.headers["connection"] == "close"
    r = httpx.post(f"{live.url}/v1/machines", content=body(1000),
                   headers={"content-type": "application/json"}, timeout=UP)
    err(r, 400, "bad_request")  # read whole: "xxx..." is no JSON


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(live: Live
                                                                              ) -> None:
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=UP) as s:
        s.sendall(b"POST /v1/images/upload HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 10000000000\r\n\r\n")  # 10 GB, none of it sent
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert json.loads(payload)["error"] == {
        "code": "too_large",
        "message": "the request body is larger than 2 GiB, the limit of this endpoint"}


# ------------------------------------------------------------------ open streams: 429


def test_streams_beyond_the_limit_are_429_per_tcp_client_and_unix_is_exempt(live: Live
                                                                             ) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect as ws_connect

    with contextlib.ExitStack() as stack:
        tcp = stack.enter_context(httpx.Client(base_url=live.url, timeout=UP))
        held = []
        for _ in range(live.per_client):
            r = stack.enter_context(tcp.stream("GET", "/v1/events"))
            assert r.status_code == 200
            held.append(r)
        # one more stream of any kind: 429, with the API's error body
        for method, path in [("GET", "/v1/events"), ("GET", "/v1/machines/x/logs"),
                             ("POST", "/v1/machines/x/exec"), ("POST", "/v1/machines/x/wait"),
                             ("POST", "/v1/machines/x/exec/stream")]:
            msg = err(tcp.request(method, path), 429, "too_many_streams")
            assert msg.startswith(f"too many open streams: this client has "
                                  f"{live.per_client} (the limit)")
        # a WebSocket is refused with a status before the handshake
        ws_url = live.url.replace("http://", "ws://") + "/v1/machines/x/exec/ws"
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(ws_url, open_timeout=UP)
        assert refused.value.response.status_code == 429
        assert json.loads(bytes(refused.value.response.body or b""))["error"]["code"] == \
            "too_many_streams"
        # short requests are not counted
        assert tcp.get("/v1/version").status_code == 200
        # the owner's Unix socket is not limited
        unix = stack.enter_context(httpx.Client(
            transport=httpx.HTTPTransport(uds=str(live.socket)), base_url="http://ember",
            timeout=UP))
        for _ in range(live.per_client + 2):
            assert stack.enter_context(unix.stream("GET", "/v1/events")).status_code == 200
        # a stream that ends gives its place back
        held[0].close()
        deadline = time.monotonic() + UP
        while True:
            with tcp.stream("GET", "/v1/events") as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "the closed stream was never counted out"
            time.sleep(0.05)


def test_stream_limit_is_per_peer_address() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    limited = StreamLimit(app, per_client=1)
    limited.open["10.0.0.1"] = 1  # that peer holds its one stream

    def status(peer: str, path: str = "/v1/events") -> int:
        scope = {"type": "http", "method": "GET", "path": path, "headers": [],
                 "server": ("127.0.0.1", 7777), "client": (peer, 40000)}
        return int(_asgi(limited, scope, [b""])[0]["status"])

    assert status("10.0.0.1") == 429
    assert status("10.0.0.2") == 200 and limited.open == {"10.0.0.1": 1}
    assert status("10.0.0.1", "/v1/version") == 200  # not a stream
    assert status("10.0.0.1", "/v1/machines/x/exec/detach") == 200
