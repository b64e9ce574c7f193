"""Ember's own resolver: what enforces an egress policy's domain rules.

A machine whose policy names domains (``allow=api.example.com:443``,
``deny=*.ads.example``) gets its DNS here instead of from the host's resolver:
a UDP socket bound to ``10.0.2.3:53`` inside the machine's network namespace
(``vmm/netns.py``), served by one thread of the process that supervises the
machine (the daemon, or ``ember run``). For each query:

* a name no rule allows (with allow rules), or one a deny rule names, gets
  NXDOMAIN, and counts as denied;
* any other name is asked of the upstream resolver (``EMBER_DNS_UPSTREAM`` as
  ``HOST[:PORT]``, else the host's first resolver in ``/etc/resolv.conf``),
  from the host's namespace; with allow rules, every IPv4 address in the
  answer is added to the machine's nftables set (``allow_dns``, or
  ``allow_dns_ports`` with the rule's port) for the record's TTL (at least
  ``MIN_TTL``) before the answer goes back, so the guest's next connection
  to it passes.

``example.com`` matches that name only, ``*.example.com`` any name below it
(not the apex). DNS to any other resolver, DNS over TCP or TLS (853) and
connections to addresses no answer or rule named are the firewall's to drop.
While the supervising process is down (a daemon restarting), the guest has no
DNS; a re-adopted machine gets its resolver back (``Machine.adopt``).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ember.errors import VMMError
from ember.host import jail
from ember.util import log
from ember.vmm.egress import EgressPolicy, Rule
from ember.vmm.network import DNS_IP

#: The shortest time an answer's addresses stay allowed, seconds.
MIN_TTL = 10
#: The longest wait for the upstream resolver, seconds.
UPSTREAM_TIMEOUT = 3.0
#: Largest DNS message over UDP we read.
MAX_QUERY = 4096
#: Queries in flight at once, all machines together; a guest flooding its resolver
#: gets the rest dropped (as a lossy network would), never a growing queue.
MAX_PENDING = 64


def matches(rule: Rule, name: str) -> bool:
    """Whether domain ``rule`` names ``name`` (lower case, no final dot)."""
    if rule.domain is None:
        return False
    if rule.domain.startswith("*."):
        return name.endswith(rule.domain[1:]) and name != rule.domain[2:]
    return name == rule.domain


def upstream() -> tuple[str, int]:
    """The resolver queries go to: ``EMBER_DNS_UPSTREAM`` or the host's first one.

    Raises:
        VMMError: none is configured.
    """
    from pathlib import Path

    env = os.environ.get("EMBER_DNS_UPSTREAM", "").strip()
    if env:
        host, _, port = env.partition(":")
        if not host or not (port or "53").isdigit() or not 1 <= int(port or 53) <= 65535:
            raise VMMError(f"EMBER_DNS_UPSTREAM={env!r}: expected HOST[:PORT]")
        return host, int(port or 53)
    with contextlib.suppress(OSError):
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                return parts[1], 53
    raise VMMError("no upstream resolver: set EMBER_DNS_UPSTREAM or /etc/resolv.conf")


@dataclass(eq=False)
class Served:
    """One machine's resolver socket and policy."""

    slot: int
    policy: EgressPolicy
    sock: socket.socket
    #: Queries answered NXDOMAIN because of the policy.
    denied: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Hub:
    """The resolver thread of this process: every served machine's socket."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ember-dns")
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        threading.Thread(target=self._run, name="ember-resolver", daemon=True).start()

    def serve(self, slot: int, policy: EgressPolicy) -> Served:
        """Start answering the DNS of slot ``slot``'s guest under ``policy``.

        Raises:
            VMMError: the socket cannot be made in the machine's namespace.
        """
        from ember.vmm import netns

        def bind() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                s.bind((DNS_IP, 53))
            except OSError:
                s.close()
                raise
            return s

        sock = netns.in_netns(netns.SlotNet(slot).netns, bind)
        sock.setblocking(False)
        served = Served(slot, policy, sock)
        with self._lock:
            self._sel.register(sock, selectors.EVENT_READ, served)
        os.write(self._wake_w, b"x")
        return served

    def stop(self, served: Served) -> None:
        with self._lock, contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(served.sock)
        os.write(self._wake_w, b"x")
        served.sock.close()

    def _run(self) -> None:
        while True:
            for key, _ in self._sel.select():
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                served: Served = key.data
                try:
                    data, peer = served.sock.recvfrom(MAX_QUERY)
                except OSError:
                    continue
                if not self._pending.acquire(blocking=False):
                    continue  # flooded: dropped
                self._pool.submit(self._answer, served, data, peer)

    def _answer(self, served: Served, data: bytes, peer: tuple[str, int]) -> None:
        try:
            reply = answer(served, data)
        except VMMError as exc:  # ours: say it (once), the guest's query goes unanswered
            jail.warn_once(f"Ember's resolver: {exc}")
            return
        except Exception as exc:  # a hostile or broken query, an upstream failure
            log.debug("dns for slot %d: %s", served.slot, exc)
            return
        finally:
            self._pending.release()
        if reply is not None:
            with contextlib.suppress(OSError):
                served.sock.sendto(reply, peer)


def answer(served: Served, data: bytes) -> bytes | None:
    """The reply to one query from the guest (None: drop it)."""
    import dns.flags
    import dns.message
    import dns.query
    import dns.rcode
    import dns.rdatatype

    try:
        query = dns.message.from_wire(data)
    except Exception:
        return None
    if len(query.question) != 1 or query.flags & dns.flags.QR:
        return None
    name = query.question[0].name.to_text(omit_final_dot=True).lower()
    policy = served.policy
    allowed = [r for r in policy.allow if matches(r, name)]
    refused = any(matches(r, name) for r in policy.deny) or (policy.allowlist and not allowed)
    if refused:
        with served.lock:
            served.denied += 1
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.NXDOMAIN)
        return bytes(reply.to_wire())
    host, port = upstream()
    response = dns.query.udp(query, host, port=port, timeout=UPSTREAM_TIMEOUT)
    if policy.allowlist:
        addresses: dict[str, int] = {}
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.A:
                for rr in rrset:
                    addresses[rr.address] = max(addresses.get(rr.address, 0), rrset.ttl)
        if addresses:
            from ember.vmm import netns

            netns.allow_resolved(served.slot, addresses, {r.port for r in allowed})
    return bytes(response.to_wire())


_hub: Hub | None = None
_hub_lock = threading.Lock()


def hub() -> Hub:
    """This process's resolver (started on first use)."""
    global _hub
    with _hub_lock:
        if _hub is None:
            _hub = Hub()
        return _hub
