"""Where the daemon listens, from the arguments or the environment: light enough for the
CLI's lean path (``cli/wire.py``), which must not import the SDK's models or httpx."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from ember import paths
from ember.errors import EmberError
from ember.sdk.errors import InvalidRequest

if TYPE_CHECKING:
    import ssl

#: Seconds to connect: the daemon is local, so a slow connect means it is not there.
CONNECT_TIMEOUT = 5.0
#: The host part of URLs on the Unix socket (any name works; this one reads well in logs).
UNIX_BASE_URL = "http://ember"


@dataclass(frozen=True)
class Endpoint:
    """Where the daemon listens: a Unix socket, or a TCP ``base_url`` with a bearer token
    (and, for ``https://``, the CA file its certificate is checked against, if not the
    system's)."""

    base_url: str
    socket_path: Path | None = None
    token: str | None = None
    ca: Path | None = None

    @property
    def tls(self) -> bool:
        return self.socket_path is None and self.base_url.startswith("https://")

    def ssl_context(self) -> ssl.SSLContext | None:
        """For ``https://``: a context that verifies the daemon's certificate and name,
        against ``ca`` or else the system's trust store; None for plain HTTP.

        Raises:
            EmberError: the CA file cannot be read or holds no certificate.
        """
        if not self.tls:
            return None
        import ssl

        try:
            return ssl.create_default_context(cafile=self.ca)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise EmberError(f"cannot use the CA file {self.ca} (EMBER_TLS_CA): {why}"
                             ) from None

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


def unreachable(endpoint: Endpoint, exc: BaseException) -> str:
    """Why the daemon at TCP ``endpoint`` cannot be reached, with what to do about a
    certificate that does not verify."""
    text = f"cannot reach the ember daemon at {endpoint.base_url}: {exc}"
    if endpoint.tls and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        text += (" (set EMBER_TLS_CA, or the client's ca, to the CA certificate that signed "
                 "the daemon's)")
    return text


def default_socket() -> Path:
    return paths.data_dir() / "ember.sock"


def resolve_endpoint(socket_path: str | os.PathLike[str] | None, base_url: str | None,
                     token: str | None, ca: str | os.PathLike[str] | None = None) -> Endpoint:
    """The daemon's address from the arguments, else ``EMBER_HOST``, else the default socket.

    ``EMBER_HOST`` (or ``base_url``) is ``https://HOST:PORT``, ``http://HOST:PORT``,
    ``HOST:PORT`` (plain HTTP) or ``unix:///path/to/ember.sock``; the token defaults to
    ``EMBER_TOKEN``, the CA file of an ``https://`` daemon to ``EMBER_TLS_CA`` (else the
    system's trust store is used).
    """
    if socket_path is not None and base_url is not None:
        raise ValueError("give socket_path or base_url, not both")
    if socket_path is None and base_url is None:
        base_url = os.environ.get("EMBER_HOST") or None
    if base_url is not None and base_url.startswith("unix://"):
        socket_path, base_url = base_url[len("unix://"):], None
    if base_url is None:
        if ca is not None:
            raise ValueError("ca is for an https:// daemon, not a Unix socket")
        sock = Path(os.path.abspath(socket_path)) if socket_path is not None else default_socket()
        return Endpoint(UNIX_BASE_URL, sock, None)
    url = base_url.rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url {base_url!r}: expected https://HOST:PORT, "
                         "http://HOST:PORT or unix:///PATH")
    if not url.startswith("https://"):
        if ca is not None:
            raise ValueError(f"ca is for an https:// daemon, not {url}")
    elif ca is None:
        ca = os.environ.get("EMBER_TLS_CA") or None
    return Endpoint(url, None, token if token is not None else os.environ.get("EMBER_TOKEN"),
                    Path(os.path.abspath(ca)) if ca is not None else None)


def quote_name(name: str) -> str:
    """A machine name as a path segment of the API."""
    if not name:
        raise InvalidRequest(422, "invalid", "a machine name must not be empty")
    return quote(name, safe="")
