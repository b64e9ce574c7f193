"""The CLI's lean way to the daemon: JSON over ``http.client``, no httpx, no pydantic.

``ember ps`` and ``ember exec`` are typed in loops and scripts; importing the SDK
(httpx, the pydantic models) costs them three times what the request does. The
commands on this path read the API's JSON as it is (the OpenAPI document, which
the SDK's models also follow, stays the one description of the wire format) and
raise the SDK's own error classes, with the daemon's message, for any 4xx/5xx.
A daemon that is not running is started as the SDK starts it (the slow path,
once).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

from ember.sdk.endpoint import (
    CONNECT_TIMEOUT,
    Endpoint,
    quote_name,
    resolve_endpoint,
    unreachable,
)
from ember.sdk.errors import DaemonUnavailable, api_error

__all__ = ["Wire", "quote_name"]

#: Seconds for an answer (a start waits for a boot).
TIMEOUT = 300.0


class _Default:
    """The default timeout (:data:`TIMEOUT`), as opposed to None (no timeout)."""


DEFAULT = _Default()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("ember", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        sock.settimeout(self.timeout)
        self.sock = sock


class Wire:
    """One daemon connection for one CLI command."""

    def __init__(self, endpoint: Endpoint | None = None, *, autostart: bool = True) -> None:
        self.endpoint = endpoint or resolve_endpoint(None, None, None)
        self._autostart = autostart and self.endpoint.socket_path is not None
        self._conn: http.client.HTTPConnection | None = None

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._conn is None:
            ep = self.endpoint
            if ep.socket_path is not None:
                self._conn = _UnixConnection(str(ep.socket_path), TIMEOUT)
            else:
                u = urlsplit(ep.base_url)
                if u.scheme == "https":  # verified: EMBER_TLS_CA, else the system's CAs
                    self._conn = http.client.HTTPSConnection(u.netloc, timeout=TIMEOUT,
                                                             context=ep.ssl_context())
                else:
                    self._conn = http.client.HTTPConnection(u.netloc, timeout=TIMEOUT)
        self._conn.timeout = timeout
        if self._conn.sock is not None:
            self._conn.sock.settimeout(timeout)
        return self._conn

    def _send(self, method: str, path: str, body: Any, params: dict[str, Any] | None,
              timeout: float | None | _Default) -> http.client.HTTPResponse:
        if isinstance(timeout, _Default):
            timeout = TIMEOUT
        if params:
            path = f"{path}?{urlencode({k: _param(v) for k, v in params.items()})}"
        headers = {"Host": "ember", **self.endpoint.headers()}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            conn = self._connection(timeout)
            try:
                conn.request(method, path, body=data, headers=headers)
                return conn.getresponse()
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                self.close()
                if attempt or not self._autostart:
                    raise DaemonUnavailable(self._unreachable(exc)) from None
                from ember.sdk.daemon import ensure_daemon

                assert self.endpoint.socket_path is not None
                ensure_daemon(self.endpoint.socket_path)
            except TimeoutError:
                self.close()
                raise DaemonUnavailable(f"the ember daemon at {self.endpoint.describe()} did "
                                        "not answer in time") from None
            except ssl.SSLCertVerificationError as exc:
                self.close()
                raise DaemonUnavailable(unreachable(self.endpoint, exc)) from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise DaemonUnavailable(f"lost the connection to the ember daemon at "
                                        f"{self.endpoint.describe()}: {exc}") from None
        raise AssertionError("unreachable")

    def _unreachable(self, exc: BaseException) -> str:
        if self.endpoint.socket_path is not None:
            return (f"cannot reach the ember daemon at {self.endpoint.socket_path}: {exc} "
                    "(start it with `ember serve`)")
        return unreachable(self.endpoint, exc)

    def call(self, method: str, path: str, body: Any = None,
             params: dict[str, Any] | None = None,
             timeout: float | None | _Default = DEFAULT) -> Any:
        """The JSON answer of a request (None for an empty body); 4xx/5xx raise.
        ``timeout``: seconds for the answer (None: wait as long as it takes)."""
        resp = self._send(method, path, body, params, timeout)
        data = resp.read()
        _check(resp, data)
        return json.loads(data) if data else None

    @contextlib.contextmanager
    def lines(self, method: str, path: str, body: Any = None,
              params: dict[str, Any] | None = None, *,
              raw: bool = False) -> Iterator[Iterator[bytes]]:
        """A streamed answer, NDJSON line by line (``raw``: bytes as they come), with no
        read timeout (a follow may be quiet for hours)."""
        resp = self._send(method, path, body, params, None)
        if resp.status >= 400:
            _check(resp, resp.read())

        def each() -> Iterator[bytes]:
            try:
                if raw:
                    while chunk := resp.read1(65536):
                        yield chunk
                    return
                while line := resp.readline():
                    if line.strip():
                        yield line
            except (OSError, http.client.HTTPException) as exc:
                raise DaemonUnavailable(f"lost the connection to the ember daemon at "
                                        f"{self.endpoint.describe()}: {exc}") from None
        try:
            yield each()
        finally:
            resp.close()


def _param(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _check(resp: http.client.HTTPResponse, data: bytes) -> None:
    if resp.status >= 400:
        raise api_error(resp.status, data)
