"""A machine's network: its mode, its published ports, and the addresses the guest gets.

Two modes:

* ``"user"``: QEMU's user-mode network (libslirp), rootless NAT. The guest has
  one virtio-net NIC, ``eth0``, with a fixed address; its outbound TCP and UDP
  connections become ordinary sockets of the QEMU process. The gateway
  ``10.0.2.2`` is the host itself: a connection to ``10.0.2.2:P`` reaches the
  host's ``127.0.0.1:P``, so every service on the host's loopback is reachable
  from the guest. Published ports (``hostfwd``) are sockets QEMU listens on.
* ``"none"``: no NIC at all; the guest has only ``lo``.

The guest's addresses (slirp's defaults, stated here and nowhere else):

=========  ==============
guest      10.0.2.15/24
gateway    10.0.2.2 (the host's loopback)
DNS        10.0.2.3 (slirp forwards to the host's resolver)
=========  ==============

The guest agent configures them statically from ``ember.net=`` on the kernel
command line (no DHCP client in the guest, no wait for a lease).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
from dataclasses import dataclass

from ember.errors import EmberError

NETWORK_USER = "user"
NETWORK_NONE = "none"
NETWORK_MODES = (NETWORK_USER, NETWORK_NONE)

#: What carries the ``"user"`` network (``default_backend``).
BACKEND_SLIRP = "slirp"
BACKEND_TAP = "tap"
NET_BACKENDS = (BACKEND_SLIRP, BACKEND_TAP)

GUEST_IP = "10.0.2.15"
GUEST_PREFIX = 24
GATEWAY_IP = "10.0.2.2"
DNS_IP = "10.0.2.3"
NETWORK_CIDR = "10.0.2.0/24"

DEFAULT_HOST_IP = "127.0.0.1"


@dataclass(frozen=True)
class PortMapping:
    """A guest TCP port published on the host: ``host_ip:host_port`` → guest ``guest_port``."""

    host_port: int
    guest_port: int
    host_ip: str = DEFAULT_HOST_IP
    protocol: str = "tcp"

    def __post_init__(self) -> None:
        for what, port in (("host", self.host_port), ("guest", self.guest_port)):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise EmberError(f"{what} port must be between 1 and 65535, not {port!r}")
        try:
            ipaddress.IPv4Address(self.host_ip)
        except (ipaddress.AddressValueError, ValueError):
            raise EmberError(f"host address must be an IPv4 address such as 127.0.0.1, "
                             f"not {self.host_ip!r}") from None
        if self.protocol != "tcp":
            raise EmberError(f"only tcp ports can be published, not {self.protocol!r}")

    def __str__(self) -> str:
        return f"{self.host_ip}:{self.host_port}->{self.guest_port}/{self.protocol}"


def parse_port(text: str) -> PortMapping:
    """Parse a ``-p`` value: ``HOST:GUEST``, ``IP:HOST:GUEST`` or ``GUEST``, optionally ``/tcp``.

    With ``GUEST`` alone (or an empty or ``0`` host port) the host port is one the
    kernel picks free on the host address, by binding port 0 there; it may in theory
    be taken again before QEMU binds it (then the machine fails to start).

    Raises:
        EmberError: the text is malformed, a port is out of range, the address is
            not IPv4, the protocol is not tcp, or no free port could be bound.
    """
    spec = text.strip()
    if not spec:
        raise EmberError("empty port mapping: use HOST:GUEST, IP:HOST:GUEST or GUEST")
    if "/" in spec:
        spec, protocol = spec.rsplit("/", 1)
        if protocol.lower() != "tcp":
            raise EmberError(f"invalid port mapping {text!r}: only tcp ports can be published")
    parts = spec.split(":")
    if len(parts) == 1:
        host_ip, host, guest = DEFAULT_HOST_IP, "", parts[0]
    elif len(parts) == 2:
        host_ip, (host, guest) = DEFAULT_HOST_IP, parts
    elif len(parts) == 3:
        host_ip, host, guest = parts
        host_ip = host_ip or DEFAULT_HOST_IP
    else:
        raise EmberError(f"invalid port mapping {text!r}: use HOST:GUEST, IP:HOST:GUEST or GUEST")
    guest_port = _port(guest, "guest", text)
    host_port = _port(host, "host", text) if host not in ("", "0") else 0
    # Validate the address (and the guest port) before binding anything.
    PortMapping(host_port or 1, guest_port, host_ip)
    if host_port == 0:
        host_port = free_port(host_ip)
    return PortMapping(host_port, guest_port, host_ip)


def _port(value: str, what: str, text: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise EmberError(f"invalid port mapping {text!r}: {what} port {value!r} is not a number")
    port = int(value)
    if not 1 <= port <= 65535:
        raise EmberError(f"invalid port mapping {text!r}: {what} port {port} is not "
                         "between 1 and 65535")
    return port


class PortUnavailable(EmberError):
    """A host port cannot be published: in use, privileged, or not a local address.

    ``port`` is the mapping concerned (an API answers 409 Conflict for it).
    """

    def __init__(self, port: PortMapping, reason: str) -> None:
        self.port = port
        super().__init__(f"host port {port.host_ip}:{port.host_port} {reason}")


def _bind_error(p: PortMapping) -> str | None:
    """Why QEMU could not listen on ``p``'s host port now, or None if it could.

    Binds as libslirp does (``SO_REUSEADDR``: a port in TIME_WAIT is free).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((p.host_ip, p.host_port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "is already in use"
            if exc.errno == errno.EACCES:
                return "needs privileges (ports below 1024 need root)"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"is not available: {p.host_ip} is not an address of this host"
            return f"cannot be bound: {exc.strerror}"
    return None


def check_ports_free(ports: tuple[PortMapping, ...]) -> None:
    """Fail early, with the reason, if a host port cannot be published right now.

    Advisory: another process may still take the port before QEMU binds it; then
    the machine fails to start and ``port_error`` reads QEMU's message.

    Raises:
        PortUnavailable: the first port that cannot be bound, and why.
    """
    for p in ports:
        reason = _bind_error(p)
        if reason:
            raise PortUnavailable(p, reason)


#: QEMU's (7.2, libslirp) words when a hostfwd rule cannot be set up. It gives no
#: cause: a port in use, a privileged port and a foreign address all read alike.
_HOSTFWD_FAILED = re.compile(r"Could not set up host forwarding rule '(\w+):([0-9.]*):(\d+)-")


def port_error(qemu_message: str, ports: tuple[PortMapping, ...]) -> PortUnavailable | None:
    """The ``PortUnavailable`` behind a QEMU start failure, or None if it was something else.

    ``qemu_message`` is QEMU's error (``MachineCrashed``'s message carries its last
    line); the cause is found by binding the port again.
    """
    m = _HOSTFWD_FAILED.search(qemu_message)
    if not m:
        return None
    host_ip, host_port = m.group(2) or DEFAULT_HOST_IP, int(m.group(3))
    for p in ports:
        if (p.host_ip, p.host_port) == (host_ip, host_port):
            return PortUnavailable(p, _bind_error(p) or "was in use when the machine started")
    return None


def free_port(host_ip: str = DEFAULT_HOST_IP) -> int:
    """A TCP port free on ``host_ip`` now (the kernel's pick for a bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host_ip, 0))
        except OSError as exc:
            raise EmberError(f"cannot bind a port on {host_ip}: {exc.strerror}") from exc
        port: int = s.getsockname()[1]
        return port


def check_network(network: str, ports: tuple[PortMapping, ...]) -> None:
    """Validate a network mode and its published ports together.

    Raises:
        EmberError: unknown mode, ports with ``"none"``, or two mappings of one host port.
    """
    if network not in NETWORK_MODES:
        raise EmberError(f"network must be {' or '.join(NETWORK_MODES)}, not {network!r}")
    if ports and network == NETWORK_NONE:
        raise EmberError("ports cannot be published with network none")
    for i, p in enumerate(ports):
        if not isinstance(p, PortMapping):
            raise EmberError(f"a published port must be a PortMapping, not {p!r}")
        for other in ports[:i]:
            if other.host_port == p.host_port and (
                    other.host_ip == p.host_ip or "0.0.0.0" in (other.host_ip, p.host_ip)):
                raise EmberError(f"host port {p.host_ip}:{p.host_port} is published twice "
                                 f"({other} and {p})")


def default_backend() -> str:
    """The backend new machines' ``"user"`` network gets on this host.

    ``"tap"`` (``vmm/netns.py``: a namespace and firewall per machine) where the VMM
    is fully jailed (root) and the host has ``ip``, ``nft`` and ``/dev/net/tun``;
    ``"slirp"`` elsewhere, or when ``EMBER_NET_BACKEND=slirp`` asks for it.
    """
    from ember.host import jail
    from ember.vmm import netns

    return backend_choice(os.environ.get("EMBER_NET_BACKEND", ""),
                          jail.policy().mode == jail.MODE_FULL, netns.unavailable())[0]


def backend_choice(asked: str, jailed: bool, tap_unavailable: str) -> tuple[str, str]:
    """(backend, why) for a requested backend ("" for the default) on a host."""
    asked = asked.strip().lower()
    if asked == BACKEND_SLIRP:
        return BACKEND_SLIRP, "slirp, asked for by EMBER_NET_BACKEND"
    if not jailed:
        return BACKEND_SLIRP, ("slirp: a tap needs the full jail (root); slirp cannot keep "
                               "guests from the host's loopback services")
    if tap_unavailable:
        return BACKEND_SLIRP, f"slirp: no tap network ({tap_unavailable})"
    return BACKEND_TAP, ("tap: a namespace and firewall per machine; guests reach public "
                         "addresses only")


def guest_cmdline_param(network: str) -> str:
    """The kernel command-line parameter that tells the agent how to set up ``eth0``.

    ``ember.net=ADDRESS/PREFIX,GATEWAY,DNS`` for ``"user"``; nothing for ``"none"``.
    """
    if network == NETWORK_USER:
        return f"ember.net={GUEST_IP}/{GUEST_PREFIX},{GATEWAY_IP},{DNS_IP}"
    return ""
