"""What one request, and one client, may take of the daemon: two ASGI middlewares.

:class:`BodyLimit` bounds every request body, on every listener: a declared
``Content-Length`` over the limit is answered 413 before a byte of the body is
read, and a body without one (chunked) is counted as it arrives and cut off
with 413 once it passes the limit. JSON requests may have 1 MiB; exec requests
128 MiB (their JSON carries up to 16 Mi characters of stdin); the archives of
``POST /v1/images/upload`` and ``PUT /v1/machines/{name}/files`` 2 GiB, which
their routes stream to a file in the data dir, never into memory.

:class:`StreamLimit` bounds the long-lived requests (event and log streams,
execs of every kind, waits, pulls) a TCP client may hold open at once: 64 per
peer address, then 429. The Unix socket is exempt: it is mode 0600, its only
client is the daemon's owner, who can run anything as that user anyway.

Both answer with the API's error body, ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MiB = 1 << 20
#: Largest body of a JSON request.
JSON_BODY = 1 * MiB
#: Largest body of an exec request: ExecCreate's stdin is up to 16 Mi characters, and a JSON
#: encoder that escapes every non-ASCII character (Python's default) writes 6 bytes for one.
EXEC_BODY = 128 * MiB
#: Largest archive uploaded (an image, files copied into a machine); streamed to disk.
UPLOAD_BODY = 2 << 30
#: Long-lived requests one TCP client (peer address) may have open at once.
STREAMS_PER_CLIENT = 64

#: The routes whose bodies may be larger than :data:`JSON_BODY` (paths, matched whole).
BODY_LIMITS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"/v1/images/upload"), UPLOAD_BODY),
    (re.compile(r"/v1/machines/[^/]+/files"), UPLOAD_BODY),
    (re.compile(r"/v1/machines/[^/]+/exec(/stream|/detach)?"), EXEC_BODY),
)
#: The routes whose requests may stay open as long as the client likes (matched whole).
STREAM_ROUTES = re.compile(
    r"/v1/(events|images/pull|machines/[^/]+/(logs|wait|exec|exec/stream|exec/ws))")


def size_text(n: int) -> str:
    if n and n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    if n and n % MiB == 0:
        return f"{n >> 20} MiB"
    return f"{n} bytes"


def body_limit(path: str) -> int:
    """The largest request body the route of ``path`` takes."""
    for pattern, limit in BODY_LIMITS:
        if pattern.fullmatch(path):
            return limit
    return JSON_BODY


def over_tcp(scope: Scope) -> bool:
    """Whether the request came over TCP (a Unix socket's server address has no port)."""
    server = scope.get("server")
    return server is not None and server[1] is not None


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


async def send_error(send: Send, status: int, code: str, message: str, *,
                     close: bool = False) -> None:
    """Answer an HTTP request with the API's error body (``close``: and end the connection,
    for a request whose body is left unread)."""
    body = error_body(code, message)
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    """Raised by the body's ``receive`` once the body passed its limit: FastAPI's body
    parsing lets an HTTPException through, and the app's handler renders it (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {size_text(limit)}, the "
                              "limit of this endpoint")


class BodyLimit:
    """Requests whose body is larger than their route's limit are answered 413."""

    def __init__(self, app: ASGIApp, limit_of: Callable[[str], int] = body_limit) -> None:
        self.app = app
        self.limit_of = limit_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_of(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:  # refused before reading any of it
            await send_error(send, 413, "too_large", str(BodyTooLarge(limit).detail),
                             close=True)
            return
        received = 0
        exceeded = False
        started = False

        async def receive_counted() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge(limit)
            return message

        async def send_marked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if exceeded:  # the rest of the body is not read: the connection ends
                    message = {**message, "headers": [*message.get("headers", ()),
                                                      (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, receive_counted, send_marked)
        except BodyTooLarge as exc:  # not rendered by the app (no handler on its way)
            if started:
                raise
            await send_error(send, 413, "too_large", str(exc.detail), close=True)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers") or ():
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class StreamLimit:
    """A TCP client (by peer address) holds at most ``per_client`` long-lived requests
    (:data:`STREAM_ROUTES`) open at once; one more is answered 429 (a WebSocket: refused
    with 429 before the handshake, or accepted and closed with 1013 by a server that
    cannot refuse one with a status). Unix-socket clients are not limited."""

    def __init__(self, app: ASGIApp, per_client: int = STREAMS_PER_CLIENT,
                 routes: re.Pattern[str] = STREAM_ROUTES) -> None:
        self.app = app
        self.per_client = per_client
        self.routes = routes
        #: Open long-lived requests by peer address (touched on the event loop only).
        self.open: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not over_tcp(scope) \
                or not self.routes.fullmatch(scope["path"]):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        peer = str(client[0]) if client else "?"
        if self.open.get(peer, 0) >= self.per_client:
            await self._refuse(scope, receive, send)
            return
        self.open[peer] = self.open.get(peer, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            left = self.open[peer] - 1
            if left:
                self.open[peer] = left
            else:
                del self.open[peer]

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = (f"too many open streams: this client has {self.per_client} (the limit); "
                   "close one first")
        if scope["type"] == "http":
            await send_error(send, 429, "too_many_streams", message)
            return
        if (await receive())["type"] != "websocket.connect":
            return
        if "websocket.http.response" in (scope.get("extensions") or {}):
            body = error_body("too_many_streams", message)
            await send({"type": "websocket.http.response.start", "status": 429, "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "websocket.http.response.body", "body": body})
            return
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1013, "reason": "too many open streams"})


async def spool(chunks: AsyncIterator[bytes], write: Callable[[bytes], Awaitable[object]],
                batch: int = MiB) -> int:
    """Copy a streamed request body to ``write`` in pieces of about ``batch`` bytes (one
    hand-off to a thread per piece, not per network read); the bytes copied."""
    buf = bytearray()
    total = 0
    async for chunk in chunks:
        buf += chunk
        total += len(chunk)
        if len(buf) >= batch:
            await write(bytes(buf))
            buf.clear()
    if buf:
        await write(bytes(buf))
    return total
