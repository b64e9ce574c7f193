"""Where the daemon listens, from the arguments or the environment: light enough for the
CLI's lean path (``cli/wire.py``), which must not import the SDK's models or httpx."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from ember import paths
from ember.sdk.errors import InvalidRequest

#: Seconds to connect: the daemon is local, so a slow connect means it is not there.
CONNECT_TIMEOUT = 5.0
#: The host part of URLs on the Unix socket (any name works; this one reads well in logs).
UNIX_BASE_URL = "http://ember"


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon listens: a Unix socket, or a TCP ``base_url`` with a bearer token."""

    base_url: str
    socket_path: Path | None = None
    token: str | None = None

    def describe(self) -> str:
        return str(self.socket_path) if self.socket_path is not None else self.base_url

    def headers(self) -> dict[str, str]:
        if self.socket_path is None and self.token:
            return {"Authorization": f"Bearer {self.token}"}
        return {}

    def ws_url(self, path: str) -> str:
        base = UNIX_BASE_URL if self.socket_path is not None else self.base_url
        scheme, rest = base.split("://", 1)
        return ("wss" if scheme == "https" else "ws") + "://" + rest + path


def default_socket() -> Path:
    return paths.data_dir() / "ember.sock"


def resolve_endpoint(socket_path: str | os.PathLike[str] | None, base_url: str | None,
                     token: str | None) -> Endpoint:
    """The daemon's address from the arguments, else ``EMBER_HOST``, else the default socket.

    ``EMBER_HOST`` (or ``base_url``) is ``http://HOST:PORT``, ``HOST:PORT`` or
    ``unix:///path/to/ember.sock``; the token defaults to ``EMBER_TOKEN``.
    """
    if socket_path is not None and base_url is not None:
        raise ValueError("give socket_path or base_url, not both")
    if socket_path is None and base_url is None:
        base_url = os.environ.get("EMBER_HOST") or None
    if base_url is not None and base_url.startswith("unix://"):
        socket_path, base_url = base_url[len("unix://"):], None
    if base_url is None:
        sock = Path(os.path.abspath(socket_path)) if socket_path is not None else default_socket()
        return Endpoint(UNIX_BASE_URL, sock, None)
    url = base_url.rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url {base_url!r}: expected http://HOST:PORT or unix:///PATH")
    return Endpoint(url, None, token if token is not None else os.environ.get("EMBER_TOKEN"))


def quote_name(name: str) -> str:
    """A machine name as a path segment of the API."""
    if not name:
        raise InvalidRequest(422, "invalid", "a machine name must not be empty")
    return quote(name, safe="")
