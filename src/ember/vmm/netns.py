"""The default network as root: a network namespace per machine, a tap, and nftables.

The guest sees what it saw on slirp (``10.0.2.15/24``, gateway ``10.0.2.2``, DNS
``10.0.2.3``: ``vmm/network.py``), but behind it is the kernel, not QEMU:

* **A namespace per machine** (``ember-N``, N its jail slot, ``host/jail.py``)
  holding a tap (``tap0``, ``10.0.2.2/24``: the guest's gateway) and one end of a
  veth pair (``host0``, ``10.200.x.2/30``); the other end (``embN``,
  ``10.200.x.1/30``) is in the host's namespace. Ember opens the tap inside the
  namespace and hands QEMU the descriptor: QEMU itself runs in an empty network
  namespace of its own (the jail) and cannot open a socket anywhere.
* **A firewall the guest cannot touch**, in the machine's namespace: the guest
  may open connections to public addresses and nothing else. Dropped (and
  counted): loopback, ``0/8``, private ranges (``10/8``, ``172.16/12``,
  ``192.168/16``), shared ``100.64/10``, link-local ``169.254/16`` (the cloud
  metadata address), ``192.0.0/24``, benchmarking ``198.18/15``, multicast and
  reserved. Connections to the namespace itself (the gateway) are dropped, except
  ICMP echo; so is everything the guest has not opened, except published ports.
  In the host's namespace, nothing that arrives from ``embN`` is delivered to the
  host itself (its own addresses, whatever their range) unless it answers a
  connection the host opened.
* **DNS**: ``10.0.2.3:53`` is forwarded (DNAT) to the host's first resolver in
  ``/etc/resolv.conf``. A loopback resolver (systemd-resolved's 127.0.0.53)
  cannot be reached from the namespace: then the guest has no DNS, and the
  machine's log says so.
* **Published ports** are the kernel's too: a DNAT on the host (``prerouting``
  for other hosts, ``output`` for the host's own connections, loopback included
  through ``route_localnet`` on ``embN``) to ``10.200.x.2:GUEST``, and a second
  DNAT in the namespace to the guest. Ember binds each host port (without
  listening) and gives the socket to QEMU: the port is reserved for as long as
  QEMU runs, and a port in use is refused before the machine starts.
* **Egress** leaves through the host's routes, masqueraded twice (in the
  namespace to ``10.200.x.2``, on the host to the outgoing interface).

Everything of a machine (namespace, veth, its nft table on the host) is named
after its slot, so what a killed process leaves behind is found and removed:
when the machine is cleaned up, and by ``sweep`` (before every tap machine
starts) for any slot nobody holds any more.
"""

from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ember.errors import VMMError
from ember.vmm.egress import EgressPolicy
from ember.vmm.network import DNS_IP, GATEWAY_IP, GUEST_IP, GUEST_PREFIX, PortMapping

#: The /30 blocks of the veth pairs: slot N has ``POOL[4N:4N+4]``.
POOL = ipaddress.IPv4Network("10.200.0.0/14")

#: Destinations a guest never reaches on the default network.
BLOCKED = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
           "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15",
           "224.0.0.0/4", "240.0.0.0/4")

TAP = "tap0"
PEER = "host0"

_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
_CLONE_NEWNET = 0x40000000

T = TypeVar("T")


def unavailable() -> str:
    """Why this host cannot give machines this network ("" when it can)."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run `ember setup`)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return ""


@dataclass(frozen=True)
class SlotNet:
    """The names and addresses of slot ``slot``'s network."""

    slot: int

    @property
    def netns(self) -> str:
        return f"ember-{self.slot}"

    @property
    def host_if(self) -> str:
        return f"emb{self.slot}"

    @property
    def table(self) -> str:
        return f"ember_{self.slot}"

    @property
    def host_ip(self) -> str:
        return str(POOL[4 * self.slot + 1])

    @property
    def ns_ip(self) -> str:
        return str(POOL[4 * self.slot + 2])

    @property
    def block(self) -> str:
        return f"{POOL[4 * self.slot]}/30"


def setup(slot: int, ports: tuple[PortMapping, ...],
          policy: EgressPolicy | None = None) -> tuple[int, list[int]]:
    """Make slot ``slot``'s namespace, veth, tap and firewall; publish ``ports``.

    Returns the tap's descriptor (for QEMU) and the sockets reserving the host
    ports (for QEMU to hold). Anything this slot's last machine left is removed
    first.

    Raises:
        PortUnavailable: a host port cannot be bound.
        VMMError: a step failed (what remains of the slot's network is removed).
    """
    from ember.vmm.network import PortUnavailable

    net = SlotNet(slot)
    reserved: list[int] = []
    try:
        for p in ports:
            reserved.append(_reserve_port(p))
    except PortUnavailable:
        for fd in reserved:
            os.close(fd)
        raise
    except OSError as exc:
        for fd in reserved:
            os.close(fd)
        raise VMMError(f"cannot reserve a host port: {exc.strerror}") from exc
    if os.path.exists(f"/run/netns/{net.netns}"):
        teardown(slot)
    _wait_link_gone(net.host_if)
    try:
        _enable_forwarding()
        _ip_batch(None, [
            f"netns add {net.netns}",
            f"link add {net.host_if} type veth peer name {PEER} netns {net.netns}",
            f"addr add {net.host_ip}/30 dev {net.host_if}",
            f"link set {net.host_if} up",
        ])
        Path(f"/proc/sys/net/ipv4/conf/{net.host_if}/route_localnet").write_text("1")
        # The host's table loads while the namespace is set up (two cores, two processes).
        host = _nft_start(host_rules(net, ports))
        resolver = host_resolver()

        def inside() -> int:
            tap = _open_tap()
            try:
                Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
                # children of this thread are born in the namespace: no `ip netns exec`
                _ip_batch(None, [
                    f"addr add {GATEWAY_IP}/{GUEST_PREFIX} dev {TAP}",
                    f"addr add {DNS_IP}/32 dev {TAP}",  # Ember's resolver, for domain rules
                    f"link set {TAP} up",
                    f"addr add {net.ns_ip}/30 dev {PEER}",
                    f"link set {PEER} up",
                    "link set lo up",
                    f"route add default via {net.host_ip}",
                ])
                _nft_wait(_nft_start(netns_rules(net, ports, resolver, policy)))
            except BaseException:
                os.close(tap)
                raise
            return tap

        try:
            tap = _in_netns(net.netns, inside)
        finally:
            _nft_wait(host)
    except BaseException:
        for fd in reserved:
            os.close(fd)
        teardown(slot)
        raise
    return tap, reserved


def sweep() -> list[int]:
    """Remove the networks of slots nobody holds (machines whose process was killed
    before it could clean up). Returns the slots swept."""
    import re

    from ember.host import jail

    swept: list[int] = []
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return swept
    for name in names:
        m = re.fullmatch(r"ember-(\d+)", name)
        if not m:
            continue
        held = jail.hold_free_slot(int(m.group(1)))
        if held is None:
            continue
        try:
            teardown(int(m.group(1)), hold=held)
            swept.append(int(m.group(1)))
        finally:
            os.close(held)
    return swept


def teardown(slot: int, *, hold: int | None = None) -> None:
    """Remove slot ``slot``'s namespace (its tap and both ends of the veth go with it)
    and its table on the host.

    With ``hold`` (a descriptor locking the slot, ``jail.hold_free_slot``) this
    does not wait: one shell does both in the background and inherits the lock, so
    the slot is not handed out again before its network is gone. Without, it waits.
    """
    net = SlotNet(slot)
    cmds = [f"nft delete table ip {net.table}"]
    if os.path.exists(f"/run/netns/{net.netns}"):
        # The kernel removes the namespace's links (and so the veth's host end) itself,
        # after `ip netns delete` returns: wait for that (bounded) before the slot is
        # let go, or its next machine finds the old link still there.
        cmds.append(f"{{ ip netns delete {net.netns}; i=0; while [ -e /sys/class/net/"
                    f"{net.host_if} ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done; }}")
    elif os.path.exists(f"/sys/class/net/{net.host_if}"):  # its namespace went by hand
        cmds.append(f"ip link delete {net.host_if}")
    proc = subprocess.Popen(["sh", "-c", " & ".join(cmds) + "; wait"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, start_new_session=hold is not None,
                            pass_fds=[hold] if hold is not None else [])
    if hold is None:
        proc.wait()


def _wait_link_gone(name: str, timeout: float = 5.0) -> None:
    """Wait for a veth end that a deleted namespace takes along (the kernel does it a
    moment later); one still there after ``timeout`` is deleted."""
    import time

    deadline = time.monotonic() + timeout
    while os.path.exists(f"/sys/class/net/{name}"):
        if time.monotonic() > deadline:
            _ip(["link", "delete", name], check=False)
            return
        time.sleep(0.005)


def _reserve_port(p: PortMapping) -> int:
    """A socket bound to ``p``'s host address and port (not listening), or PortUnavailable."""
    from ember.vmm.network import PortUnavailable, _bind_error

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((p.host_ip, p.host_port))
    except OSError:
        s.close()
        raise PortUnavailable(p, _bind_error(p) or "was taken while the machine started") from None
    return s.detach()


def host_resolver() -> str | None:
    """The host's first IPv4 resolver that a namespace can reach (None: none)."""
    try:
        lines = Path("/etc/resolv.conf").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = ipaddress.IPv4Address(parts[1])
            except ValueError:
                continue
            if addr.is_loopback:
                from ember.host.jail import warn_once

                warn_once(f"the host's resolver {addr} is on its loopback, which guests on "
                          "the tap network cannot reach: they get no DNS")
                return None
            return str(addr)
    return None


def host_rules(net: SlotNet, ports: tuple[PortMapping, ...]) -> str:
    """The host namespace's nft table for slot ``net``."""
    dnat = []
    for p in ports:
        match = "fib daddr type local" if p.host_ip == "0.0.0.0" else f"ip daddr {p.host_ip}"
        dnat.append(f"{match} tcp dport {p.host_port} dnat to {net.ns_ip}:{p.guest_port}")
    rules = "\n".join(f"    {r}" for r in dnat)
    # Guests never reach each other, not even through a port published on 0.0.0.0.
    pre_rules = "\n".join(f'    iifname != "emb*" {r}' for r in dnat)
    # Declared, deleted and made again in one transaction: whatever a crashed
    # process left of this slot's table is replaced whole.
    return f"""table ip {net.table}
delete table ip {net.table}
table ip {net.table} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
{pre_rules}
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
{rules}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{net.host_if}" ip saddr 127.0.0.0/8 masquerade
    ip saddr {net.block} oifname != "{net.host_if}" masquerade
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{net.host_if}" ct state established,related accept
    iifname "{net.host_if}" counter drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{net.host_if}" accept
    oifname "{net.host_if}" accept
  }}
}}
"""


def netns_rules(net: SlotNet, ports: tuple[PortMapping, ...], resolver: str | None,
                policy: EgressPolicy | None = None) -> str:
    """The machine namespace's nft table: the guest's firewall (``policy``: its egress)."""
    pre_rules = "\n".join(f"    {r}" for r in _prerouting_rules(ports, resolver, policy))
    forward = "\n".join(f"    {r}" for r in _forward_rules(policy))
    inputs = "\n".join(f"    {r}" for r in _input_rules(policy))
    return f"""table ip ember {{
  set blocked {{
    type ipv4_addr; flags interval;
    elements = {{ {", ".join(BLOCKED)} }}
  }}
{_policy_sets(policy)}
  counter denied {{
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
{pre_rules}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{PEER}" masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
{forward}
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
{inputs}
  }}
}}
"""


def _prerouting_rules(ports: tuple[PortMapping, ...], resolver: str | None,
                      policy: EgressPolicy | None) -> list[str]:
    """Published ports to the guest; the guest's DNS to the host's resolver, unless its
    policy has Ember's own resolver (domains) or is an allowlist of addresses only."""
    out = []
    guest_ports = sorted({p.guest_port for p in ports})
    if guest_ports:
        out.append(f'iifname "{PEER}" tcp dport {{ {", ".join(map(str, guest_ports))} }} '
                   f"dnat to {GUEST_IP}")
    if resolver and (policy is None or not (policy.domains or policy.allowlist)):
        for proto in ("udp", "tcp"):
            out.append(f'iifname "{TAP}" ip daddr {DNS_IP} {proto} dport 53 '
                       f"dnat to {resolver}")
    return out


def _input_rules(policy: EgressPolicy | None) -> list[str]:
    """What the namespace itself answers: ICMP echo, and Ember's resolver (domains)."""
    out = ["ct state established,related accept", 'iifname "lo" accept',
           f'iifname "{TAP}" icmp type echo-request accept']
    if policy is not None and policy.domains:
        out.append(f'iifname "{TAP}" ip daddr {DNS_IP} udp dport 53 accept')
    out.append(f'iifname "{TAP}" counter name denied drop')
    return out


#: The sets an egress policy fills: addresses (any port) and address . port pairs.
_SETS = (("allow", "ipv4_addr"), ("allow_ports", "ipv4_addr . inet_service"),
         ("deny", "ipv4_addr"), ("deny_ports", "ipv4_addr . inet_service"))
#: The sets Ember's resolver fills with the answers to allowed names, for their TTL.
_DNS_SETS = (("allow_dns", "ipv4_addr"), ("allow_dns_ports", "ipv4_addr . inet_service"))


def _set_elements(policy: EgressPolicy | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {name: [] for name, _ in _SETS}
    if policy is None:
        return out
    for kind, rules in (("allow", policy.allow), ("deny", policy.deny)):
        for r in sorted({r for r in rules if r.network is not None}, key=str):
            if r.port is None:
                out[kind].append(str(r.network))
            else:
                out[f"{kind}_ports"].append(f"{r.network} . {r.port}")
    return out


def _policy_sets(policy: EgressPolicy | None) -> str:
    elements = _set_elements(policy)
    out = []
    for name, kind in _SETS:
        # auto-merge is not allowed with concatenations; overlapping CIDRs are the
        # user's to avoid (nft refuses them, in one line)
        merge = " auto-merge;" if "." not in kind else ""
        els = (f"\n    elements = {{ {', '.join(elements[name])} }}" if elements[name] else "")
        out.append(f"  set {name} {{\n    type {kind}; flags interval;{merge}{els}\n  }}")
    for name, kind in _DNS_SETS:
        out.append(f"  set {name} {{\n    type {kind}; flags timeout;\n  }}")
    return "\n".join(out)


def _forward_rules(policy: EgressPolicy | None) -> list[str]:
    """The forward chain: what the guest may open, given its egress ``policy``."""
    out = ["ct state established,related accept",
           f'iifname "{PEER}" oifname "{TAP}" ct status dnat accept']
    guest = f'iifname "{TAP}" oifname "{PEER}"'
    out += [f"{guest} ip daddr @deny counter name denied drop"]
    out += [f"{guest} ip daddr . {proto} dport @deny_ports counter name denied drop"
            for proto in ("tcp", "udp")]
    if policy is not None and policy.allowlist:
        out += [f"{guest} ip daddr @allow accept", f"{guest} ip daddr @allow_dns accept"]
        out += [f"{guest} ip daddr . {proto} dport @{name} accept"
                for name in ("allow_ports", "allow_dns_ports") for proto in ("tcp", "udp")]
    else:
        # the guest's DNS, forwarded to the host's resolver by our own DNAT
        out += [f"{guest} ct status dnat accept",
                f"{guest} ip daddr @blocked counter name denied drop",
                f"{guest} accept"]
    out.append("counter name denied")
    return out


def apply_policy(slot: int, ports: tuple[PortMapping, ...],
                 policy: EgressPolicy | None) -> None:
    """Replace a running machine's egress policy in one nftables transaction.

    The sets are refilled and the forward chain rewritten; the ``denied`` counter
    and connections already open are kept.

    Raises:
        VMMError: the machine has no namespace, or nftables refused the policy.
    """
    net = SlotNet(slot)
    if not os.path.exists(f"/run/netns/{net.netns}"):
        raise VMMError(f"slot {slot} has no network namespace")
    lines = []
    for name, elements in _set_elements(policy).items():
        lines.append(f"flush set ip ember {name}")
        if elements:
            lines.append(f"add element ip ember {name} {{ {', '.join(elements)} }}")
    lines += [f"flush set ip ember {name}" for name, _ in _DNS_SETS]
    for chain, rules in (("prerouting", _prerouting_rules(ports, host_resolver(), policy)),
                         ("forward", _forward_rules(policy)), ("input", _input_rules(policy))):
        lines.append(f"flush chain ip ember {chain}")
        lines += [f"add rule ip ember {chain} {r}" for r in rules]
    _in_netns(net.netns, lambda: _nft_wait(_nft_start("\n".join(lines) + "\n")))


def allow_resolved(slot: int, addresses: dict[str, int], ports: set[int | None]) -> None:
    """Let slot ``slot``'s guest reach ``addresses`` (address → TTL, seconds) on ``ports``
    (None: any port) until their TTL runs out: what Ember's resolver just answered."""
    from ember.vmm.resolver import MIN_TTL

    lines = []
    for addr, ttl in sorted(addresses.items()):
        timeout = max(int(ttl), MIN_TTL)
        for port in sorted(ports, key=lambda p: -1 if p is None else p):
            name, el = ("allow_dns", addr) if port is None else ("allow_dns_ports",
                                                                 f"{addr} . {port}")
            # added, deleted, added again: the element's timeout starts over
            lines += [f"add element ip ember {name} {{ {el} }}",
                      f"delete element ip ember {name} {{ {el} }}",
                      f"add element ip ember {name} {{ {el} timeout {timeout}s }}"]
    if lines:
        _in_netns(SlotNet(slot).netns, lambda: _nft_wait(_nft_start("\n".join(lines) + "\n")))


def denied(slot: int) -> int:
    """Packets of new connections the guest's firewall dropped so far (slot ``slot``).

    Raises:
        VMMError: no such namespace, or nftables could not be read.
    """
    import json

    net = SlotNet(slot)
    if not os.path.exists(f"/run/netns/{net.netns}"):
        raise VMMError(f"slot {slot} has no network namespace")

    def read() -> int:
        proc = subprocess.run(["nft", "-j", "list", "counter", "ip", "ember", "denied"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise VMMError(f"cannot read the firewall's counter: {proc.stderr.strip()}")
        for item in json.loads(proc.stdout).get("nftables", []):
            if "counter" in item:
                return int(item["counter"]["packets"])
        raise VMMError("the firewall has no denied counter")
    return _in_netns(net.netns, read)


def _enable_forwarding() -> None:
    p = Path("/proc/sys/net/ipv4/ip_forward")
    if p.read_text().strip() != "1":
        p.write_text("1")


def _ip(args: list[str], *, check: bool = True) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise VMMError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _ip_batch(netns: str | None, lines: list[str]) -> None:
    cmd = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    proc = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True)
    if proc.returncode != 0:
        why = "; ".join(line for line in proc.stderr.strip().splitlines()
                        if not line.startswith("Command failed"))
        raise VMMError(f"network setup failed: {why or proc.stderr.strip()}")


def _nft_start(ruleset: str) -> subprocess.Popen[str]:
    """Start loading ``ruleset`` (in the caller's thread's network namespace)."""
    proc = subprocess.Popen(["nft", "-f", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write(ruleset)
    proc.stdin.close()
    return proc


def _nft_wait(proc: subprocess.Popen[str]) -> None:
    assert proc.stderr is not None
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise VMMError(f"nftables refused the firewall: {err.strip()}")


def _open_tap() -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF,
                    struct.pack("16sH", TAP.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
    except OSError:
        os.close(fd)
        raise
    return fd


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in network namespace ``netns`` (sockets it makes stay there)."""
    return _in_netns(netns, fn)


def _in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in network namespace ``netns``: on a thread of its own, which
    ``setns`` moves there (only the calling thread moves) and which then ends."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # re-raised on the caller's thread
            error.append(exc)

    t = threading.Thread(target=run, name=f"ember-netns-{netns}")
    t.start()
    t.join()
    if error:
        if isinstance(error[0], OSError):
            raise VMMError(f"network namespace {netns}: {error[0].strerror}") from error[0]
        raise error[0]
    return result[0]


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC
