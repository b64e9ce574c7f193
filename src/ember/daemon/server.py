"""``ember serve``: the daemon's process — sockets, authentication, start-up, shutdown.

The API listens on a Unix socket in the data dir, mode 0600: only its owner
can drive the daemon, and no token is needed there. With ``--tcp HOST:PORT``
it also listens on TCP, with TLS (``--tls-cert``, ``--tls-key``) or, only when
asked with ``--insecure-tcp``, in plain HTTP (a loopback address is no
exception). Every TCP request must carry ``Authorization: Bearer <token>``
(compared in constant time); the token comes from ``--token``,
``EMBER_TOKEN`` or ``<data dir>/token`` (created, mode 0600, when absent).
The file is read again whenever it changes (a ``stat`` per TCP request), so
``ember token rotate`` takes effect at the next request. Where the token came
from is said at start-up (stderr and the log), the token itself never.

Stopping the daemon (SIGTERM, Ctrl-C) leaves the machines running; the next
daemon re-adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import json
import os
import secrets
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember import paths
from ember.errors import EmberError
from ember.util import log

if TYPE_CHECKING:
    import ssl

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]

SOCKET_NAME = "ember.sock"


def socket_path() -> Path:
    return paths.data_dir() / SOCKET_NAME


def token_path() -> Path:
    return paths.data_dir() / "token"


def load_token(explicit: str | None = None) -> tuple[str, str]:
    """The TCP bearer token and where it came from (for the operator; never the token):
    given (``--token``), from ``$EMBER_TOKEN``, or the data dir's file (made if missing)."""
    if explicit:
        return explicit, "--token"
    token = os.environ.get("EMBER_TOKEN")
    if token:
        return token, "$EMBER_TOKEN"
    path = token_path()
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token, f"{path} (created)"
    if not token:
        raise EmberError(f"the token file {path} is empty: put a token in it, or delete it "
                         "to have one made")
    return token, str(path)


def rotate_token() -> tuple[Path, str]:
    """Put a new random token in the data dir's token file: written to a file of its own
    (mode 0600), then renamed over the old one, so that a reader sees the old token or the
    new one, never a part. The file's path and the token."""
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path, token


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


class Token:
    """The bearer token TCP requests must carry: a fixed one (``--token``,
    ``$EMBER_TOKEN``), or, with ``path``, the file's, read again whenever a ``stat`` of
    it differs (another inode, mtime or size). A file that is gone, unreadable or empty
    lets no request in until it holds a token again."""

    def __init__(self, value: str, path: Path | None = None) -> None:
        self.path = path
        self._expected: bytes | None = f"Bearer {value}".encode()
        self._stamp = _stamp(path) if path is not None else None

    def expected(self) -> bytes | None:
        """``Bearer <token>`` as the header must read, or None when there is no token."""
        if self.path is not None and (stamp := _stamp(self.path)) != self._stamp:
            self._stamp = stamp
            self._expected = self._read(self.path)
        return self._expected

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            log.warning("the token file %s cannot be read (%s): TCP requests are refused "
                        "until it holds a token", path, why)
            return None
        if not token:
            log.warning("the token file %s is empty: TCP requests are refused until it "
                        "holds a token", path)
            return None
        log.info("the token file %s changed: its token is the one TCP requests need now",
                 path)
        return f"Bearer {token}".encode()


def tcp_token(explicit: str | None = None) -> tuple[Token, str]:
    """The TCP listener's :class:`Token` and where it comes from (see :func:`load_token`):
    a token from the data dir's file follows the file."""
    value, source = load_token(explicit)
    if explicit or os.environ.get("EMBER_TOKEN"):
        return Token(value), source
    return Token(value, token_path()), source


class TokenAuth:
    """ASGI middleware: requests that arrived over TCP need the bearer token."""

    def __init__(self, app: ASGIApp, token: str | Token) -> None:
        self.app = app
        self.token = token if isinstance(token, Token) else Token(token)

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        server = scope.get("server")
        over_tcp = scope["type"] in ("http", "websocket") and server is not None \
            and server[1] is not None
        if over_tcp:
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            expected = self.token.expected()
            if expected is None or not hmac.compare_digest(got, expected):
                if scope["type"] == "websocket":
                    # Accepted, then closed with 1008 (policy violation) and a reason:
                    # a close before the accept would reach the client as a bare 403.
                    if (await receive())["type"] == "websocket.connect":
                        await send({"type": "websocket.accept"})
                        await send({"type": "websocket.close", "code": 1008,
                                    "reason": "missing or wrong bearer token"})
                    return
                body = json.dumps({"error": {"code": "unauthorized", "message":
                                             "missing or wrong bearer token"}}).encode()
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def _bind_unix(path: Path) -> socket.socket:
    """Listen on ``path`` (mode 0600), replacing a stale socket but never a live daemon's."""
    if len(os.fsencode(path)) > 107:
        raise EmberError(f"socket path {path} is too long for a Unix socket (107 bytes): "
                         "set EMBER_HOME to a shorter directory")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        raise EmberError(f"a daemon already listens on {path}")
    finally:
        probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    path.chmod(0o600)
    sock.listen(128)
    return sock


def _bind_tcp(spec: str) -> socket.socket:
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise EmberError(f"--tcp {spec!r}: expected HOST:PORT, e.g. 127.0.0.1:7777")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host or "127.0.0.1", int(port)))
    except OSError as exc:
        sock.close()
        raise EmberError(f"cannot listen on {spec}: {exc.strerror}") from None
    sock.listen(128)
    return sock


def check_tcp_flags(tcp: str | None, tls_cert: str | None, tls_key: str | None,
                    insecure_tcp: bool) -> bool:
    """Whether the TCP listener speaks TLS; refuses a TCP listener without TLS unless
    ``insecure_tcp`` (whatever the address: loopback is no exception), and flags that
    contradict each other or have no listener to apply to.

    Raises:
        EmberError: one line saying what to give.
    """
    if (tls_cert is None) != (tls_key is None):
        raise EmberError("--tls-cert and --tls-key go together: give both")
    tls = tls_cert is not None
    if not tcp:
        if tls or insecure_tcp:
            given = "--tls-cert and --tls-key are" if tls else "--insecure-tcp is"
            raise EmberError(f"{given} for the TCP listener: add --tcp HOST:PORT")
        return False
    if tls and insecure_tcp:
        raise EmberError("--insecure-tcp and --tls-cert/--tls-key exclude each other: TLS, "
                         "or plain HTTP")
    if not tls and not insecure_tcp:
        raise EmberError("--tcp needs TLS: give --tls-cert FILE --tls-key FILE, or "
                         "--insecure-tcp to serve plain HTTP (the bearer token and all "
                         "traffic then cross the network unencrypted)")
    return tls


def serve(*, tcp: str | None = None, token: str | None = None, accel: str | None = None,
          verbose: bool = False, tls_cert: str | None = None, tls_key: str | None = None,
          insecure_tcp: bool = False) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the exit status.

    Raises:
        EmberError: bad flags (see :func:`check_tcp_flags`), unusable TLS files, another
            daemon holds the data dir, a socket cannot be bound.
    """
    import logging

    import uvicorn

    from ember.api.app import create_app
    from ember.daemon.manager import Manager
    from ember.daemon.tls import TLSServer, server_context

    tls: ssl.SSLContext | None = None
    if check_tcp_flags(tcp, tls_cert, tls_key, insecure_tcp):
        assert tls_cert is not None and tls_key is not None
        tls = server_context(tls_cert, tls_key)  # before anything is locked or bound
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    home = paths.data_dir()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    # One daemon per data dir: the lock is held for the daemon's whole life.
    lock_fd = os.open(home / "daemon.pid", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(lock_fd, 64).decode(errors="replace").strip()
        os.close(lock_fd)
        who = f" (pid {pid})" if pid.isdigit() else ""
        raise EmberError(f"another ember daemon{who} is running for {home} (it holds "
                         f"{home / 'daemon.pid'})") from None
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, f"{os.getpid()}\n".encode())

    sockets = [_bind_unix(socket_path())]
    secret = None
    where = f"{socket_path()}"
    if tcp:
        secret, source = tcp_token(token)
        sockets.append(_bind_tcp(tcp))
        host, port = sockets[-1].getsockname()[:2]
        url = f"{'https' if tls else 'http'}://{host}:{port}"
        # Where the token is, never the token: the log may be read by others.
        where += f" and {url} (bearer token from {source})"
        if tls is None:
            log.warning("--insecure-tcp: %s is plain HTTP, without TLS: the bearer token "
                        "and all traffic cross the network unencrypted", url)
    mgr = Manager(accel=accel)
    mgr.recover()
    mgr.egress_watch.start()
    app: Any = create_app(mgr)
    if secret is not None:
        app = TokenAuth(app, secret)
    # uvloop and httptools (the "auto" defaults, both installed) take a few hundred
    # microseconds off every request: an exec's round trip is a handful of ms.
    # WebSocket pings have no deadline: an exec session whose process leaves its stdin
    # unread stops reading its socket (flow control), and the client's pongs wait
    # behind that stdin; a session must not be dropped for it.
    config = uvicorn.Config(app, log_level="debug" if verbose else "warning", lifespan="off",
                            ws="websockets-sansio", ws_ping_timeout=None,
                            timeout_graceful_shutdown=2, access_log=verbose)
    server = TLSServer(config, {sockets[-1].fileno(): tls} if tls is not None else {})
    log.info("ember daemon %d listening on %s (accelerator %s: %s)", os.getpid(), where,
             mgr.accel.name, mgr.accel.reason)
    print(f"ember daemon listening on {where}", file=sys.stderr, flush=True)
    try:
        asyncio.run(server.serve(sockets=sockets))
    finally:
        mgr.close()
        with contextlib.suppress(OSError):
            socket_path().unlink()
        for s in sockets:
            s.close()
    return 0
