"""TLS for the daemon's TCP listener (``ember serve --tcp ... --tls-cert ... --tls-key ...``).

uvicorn serves every socket it is given with the one ``config.ssl``; the daemon
serves two, and only the TCP one speaks TLS (the Unix socket stays plain HTTP:
its mode, 0600, is its protection). :class:`TLSServer` gives each socket its own.
Imported by ``serve`` only: it imports uvicorn.
"""

from __future__ import annotations

import socket
import ssl
from typing import NoReturn

import uvicorn

from ember.errors import EmberError


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or later) with ``cert`` (PEM: the certificate,
    then any intermediates) and its private ``key`` (PEM, not encrypted).

    Raises:
        EmberError: a file cannot be read, is not PEM, the key does not match the
            certificate, or the key is encrypted (it would need a passphrase at each start).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2

    def no_passphrase() -> NoReturn:  # else OpenSSL would prompt on the terminal
        raise EmberError(f"--tls-key {key} is encrypted: give the daemon a key without a "
                         "passphrase (readable by its user only)")

    try:
        ctx.load_cert_chain(cert, key, password=no_passphrase)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            why = exc.reason.lower().replace("_", " ") if exc.reason else "not PEM"
            raise EmberError(f"cannot use --tls-cert {cert} with --tls-key {key}: {why} "
                             "(both PEM; the key must be the certificate's)") from None
        raise EmberError(f"cannot read --tls-cert {cert} or --tls-key {key}: "
                         f"{exc.strerror or exc}") from None
    return ctx


class TLSServer(uvicorn.Server):
    """A uvicorn server whose sockets each have their TLS context (or none): ``tls`` maps a
    socket's file descriptor to its context."""

    def __init__(self, config: uvicorn.Config, tls: dict[int, ssl.SSLContext]) -> None:
        super().__init__(config)
        self.tls = tls

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's startup serves each socket it is given with config.ssl: one socket at
        # a time, each with its own. (The lifespan, run by each call, is "off".)
        assert sockets is not None and self.config.lifespan == "off"
        servers = []
        try:
            for sock in sockets:
                self.config.ssl = self.tls.get(sock.fileno())
                await super().startup(sockets=[sock])
                servers += self.servers
        finally:
            self.config.ssl = None
            self.servers = servers
