"""``ember serve``: the daemon's process — sockets, authentication, start-up, shutdown.

The API listens on a Unix socket in the data dir, mode 0600: only its owner
can drive the daemon, and no token is needed there. With ``--tcp HOST:PORT``
it also listens on TCP, where every request must carry
``Authorization: Bearer <token>`` (compared in constant time); the token comes
from ``--token``, ``EMBER_TOKEN`` or ``<data dir>/token`` (created, mode 0600,
when absent). Where it came from is said at start-up (stderr and the log),
the token itself never.

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
from typing import Any

from ember import paths
from ember.errors import EmberError
from ember.util import log

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


class TokenAuth:
    """ASGI middleware: requests that arrived over TCP need the bearer token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        server = scope.get("server")
        over_tcp = scope["type"] in ("http", "websocket") and server is not None \
            and server[1] is not None
        if over_tcp:
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
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


def serve(*, tcp: str | None = None, token: str | None = None, accel: str | None = None,
          verbose: bool = False) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the exit status."""
    import logging

    import uvicorn

    from ember.api.app import create_app
    from ember.daemon.manager import Manager

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
        secret, source = load_token(token)
        sockets.append(_bind_tcp(tcp))
        host, port = sockets[-1].getsockname()[:2]
        # Where the token is, never the token: the log may be read by others.
        where += f" and tcp://{host}:{port} (bearer token from {source})"
    mgr = Manager(accel=accel)
    mgr.recover()
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
    server = uvicorn.Server(config)
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
