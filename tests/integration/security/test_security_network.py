"""The default network as root: a guest reaches public addresses and nothing else.

Every address a guest tries belongs to a test host inside a network namespace
this module makes (a veth pair, routes to /32s on it): whatever the policy does,
no packet can leave this machine. The test host records every connection it
gets, so "refused" means it never saw one, not just that the guest timed out.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vms import boot

from ember.agent.protocol import ExecRequest
from ember.errors import EmberError
from ember.guest.bundle import GuestBundle
from ember.images import ImageStore
from ember.machine import Machine, MachineConfig
from ember.vmm import parse_port
from ember.vmm.egress import EgressPolicy
from ember.vmm.netns import SlotNet

pytestmark = [pytest.mark.security,
              pytest.mark.skipif(os.geteuid() != 0, reason="the tap network needs root")]

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
NS = "emt-hosts"
PUBLIC = "203.0.113.10"  # TEST-NET-3: "public" for the policy, and only on the test host
FORBIDDEN = {
    "metadata": "169.254.169.254",
    "private-10": "10.99.0.5",
    "private-172": "172.20.0.9",
    "private-192": "192.168.77.7",
    "shared-100": "100.64.5.5",
}
PORT = 7000
OTHER_PORT = 7001

SERVER = r"""
import socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, peer = s.accept()
        here = c.getsockname()[0]
        log.write(f"{here} {peer[0]}\n")
        c.sendall(f"hi from {here}\n".encode()); c.close()
for port in sys.argv[2:]:
    threading.Thread(target=serve, args=(int(port),), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture(scope="module")
def test_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A namespace holding PUBLIC and every FORBIDDEN address, routed to from the host.

    Yields the log of connections its server accepted ("LOCAL PEER" lines).
    """
    log = tmp_path_factory.mktemp("testnet") / "connections.log"
    log.touch()
    subprocess.run(["ip", "netns", "delete", NS], capture_output=True)
    subprocess.run(["ip", "link", "delete", "emt0"], capture_output=True)
    sh("ip", "netns", "add", NS)
    sh("ip", "link", "add", "emt0", "type", "veth", "peer", "name", "eth0", "netns", NS)
    sh("ip", "addr", "add", "198.51.100.1/30", "dev", "emt0")
    sh("ip", "link", "set", "emt0", "up")
    sh("ip", "-n", NS, "addr", "add", "198.51.100.2/30", "dev", "eth0")
    for addr in (PUBLIC, *FORBIDDEN.values()):
        sh("ip", "-n", NS, "addr", "add", f"{addr}/32", "dev", "eth0")
        sh("ip", "route", "add", f"{addr}/32", "via", "198.51.100.2", "dev", "emt0")
    sh("ip", "-n", NS, "link", "set", "eth0", "up")
    sh("ip", "-n", NS, "link", "set", "lo", "up")
    sh("ip", "-n", NS, "route", "add", "default", "via", "198.51.100.1")
    server = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", SERVER,
                               str(log), str(PORT), str(OTHER_PORT)], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        yield log
    finally:
        server.kill()
        server.wait()
        for addr in (PUBLIC, *FORBIDDEN.values()):
            subprocess.run(["ip", "route", "delete", f"{addr}/32"], capture_output=True)
        subprocess.run(["ip", "link", "delete", "emt0"], capture_output=True)
        subprocess.run(["ip", "netns", "delete", NS], capture_output=True)




@pytest.fixture(scope="module")
def guest_a(store: ImageStore, guest: GuestBundle) -> Iterator[Machine]:
    m = boot(store, guest, MachineConfig())
    assert m.spec.net_backend == "tap"
    yield m
    m.close()


@pytest.fixture(scope="module")
def guest_b(store: ImageStore, guest: GuestBundle) -> Iterator[Machine]:
    """A second machine with a server, published on the host's 0.0.0.0 and loopback."""
    m = boot(store, guest, MachineConfig(ports=(parse_port("0.0.0.0::9000"),
                                                             parse_port("127.0.0.1::9000"))))
    server = m.exec(ExecRequest(argv=["/bin/sh", "-c",
                                      "while true; do echo from-b | nc -l -p 9000; done"],
                                env=[PATH]))
    server.wait_started(timeout=30)
    yield m
    m.close()


def connect(m: Machine, addr: str, port: int, timeout: int = 3) -> str:
    """What the guest read from ``addr:port`` ("" when it could not connect)."""
    return connect_all(m, [(addr, port)], timeout)[(addr, port)]


def connect_all(m: Machine, targets: list[tuple[str, int]],
                timeout: int = 3) -> dict[tuple[str, int], str]:
    """What the guest read from each target, all tried at once ("" when it could not connect)."""
    script = " ".join(f"(nc -w {timeout} {a} {p} </dev/null > /tmp/c{i} 2>/dev/null) &"
                       for i, (a, p) in enumerate(targets))
    script += " wait; " + "; ".join(f'echo "{i}:$(cat /tmp/c{i})"'
                                     for i in range(len(targets)))
    p = m.exec(ExecRequest(argv=["/bin/sh", "-c", script], env=[PATH]))
    m.wait_process(p, timeout=60)
    lines = dict(line.split(":", 1) for line in p.stdout.decode().splitlines() if ":" in line)
    assert len(lines) == len(targets), (p.stdout, p.stderr)
    return {t: lines[str(i)] + ("\n" if lines[str(i)] else "") for i, t in enumerate(targets)}


def slot_of(m: Machine) -> SlotNet:
    return SlotNet(int(json.loads(m.spec.path("jail.json").read_text())["slot"]))


def seen(log: Path) -> list[str]:
    return log.read_text().splitlines()


def test_a_guest_reaches_a_public_address(guest_a: Machine, test_hosts: Path) -> None:
    assert connect(guest_a, PUBLIC, PORT) == f"hi from {PUBLIC}\n"
    # it arrives from the host (masqueraded), not from the guest's own address
    assert seen(test_hosts)[-1] == f"{PUBLIC} 198.51.100.1"


def test_a_guest_cannot_reach_link_local_private_or_shared_addresses(
        guest_a: Machine, test_hosts: Path) -> None:
    before = seen(test_hosts)
    got = connect_all(guest_a, [(addr, PORT) for addr in FORBIDDEN.values()])
    assert got == {(addr, PORT): "" for addr in FORBIDDEN.values()}
    assert seen(test_hosts) == before  # not a single connection reached the test host


class HostServer:
    """A TCP server on all the host's addresses that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("0.0.0.0", 0))
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.sendall(b"host\n")


def host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[3].split("/")[0] for line in out.splitlines()]


def test_a_guest_cannot_reach_any_service_of_the_host(guest_a: Machine) -> None:
    server = HostServer()
    try:
        slot = slot_of(guest_a)
        targets = ["10.0.2.2", slot.host_ip, *host_addresses()]
        assert "127.0.0.1" in targets and slot.host_ip in targets
        got = connect_all(guest_a, [(a, server.port) for a in targets])
        assert set(got.values()) == {""}, got
        assert server.accepted == 0
        # the host itself still reaches its own server
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as c:
            assert c.recv(10) == b"host\n"
    finally:
        server.sock.close()


def test_a_guest_cannot_reach_another_machine(guest_a: Machine, guest_b: Machine) -> None:
    b_ports = {p.host_ip: p.host_port for p in guest_b.spec.ports}
    b_slot = slot_of(guest_b)
    # the host reaches B through both of its published ports ...
    for host_ip in ("127.0.0.1", host_addresses()[-1]):
        port = b_ports["127.0.0.1"] if host_ip == "127.0.0.1" else b_ports["0.0.0.0"]
        deadline = time.monotonic() + 30
        reply = b""
        while reply != b"from-b\n" and time.monotonic() < deadline:
            try:
                with socket.create_connection((host_ip, port), timeout=5) as c:
                    reply = c.recv(100)
            except OSError:
                time.sleep(0.2)
        assert reply == b"from-b\n", host_ip
    # ... but guest A reaches it by no address: not its namespace's, not the host's
    got = connect_all(guest_a, [(addr, port) for addr in [b_slot.ns_ip, "10.0.2.2",
                                                          *host_addresses()]
                                for port in (9000, *b_ports.values())])
    assert set(got.values()) == {""}, got


# ------------------------------------------------------------------ egress policies


@pytest.fixture(scope="module")
def allowlisted(store: ImageStore, guest: GuestBundle) -> Iterator[Machine]:
    """A machine allowed PUBLIC:PORT and one private address (named: so allowed), nothing else."""
    policy = EgressPolicy.from_json({"allow": [f"{PUBLIC}:{PORT}", FORBIDDEN["private-10"]]})
    m = boot(store, guest, MachineConfig(egress=policy))
    yield m
    m.close()


def test_an_allowlist_reaches_what_it_names_and_nothing_else(
        allowlisted: Machine, test_hosts: Path) -> None:
    private = FORBIDDEN["private-10"]
    denied_before = allowlisted.egress_denied()
    assert denied_before is not None
    got = connect_all(allowlisted, [(PUBLIC, PORT), (private, PORT), (private, OTHER_PORT),
                                    (PUBLIC, OTHER_PORT), (FORBIDDEN["metadata"], PORT)])
    assert got == {(PUBLIC, PORT): f"hi from {PUBLIC}\n",
                   (private, PORT): f"hi from {private}\n",      # any port of a bare address
                   (private, OTHER_PORT): f"hi from {private}\n",
                   (PUBLIC, OTHER_PORT): "",                      # not that port
                   (FORBIDDEN["metadata"], PORT): ""}
    # the guest's DNS is not a way out either
    assert connect(allowlisted, "10.0.2.3", 53) == ""
    # refused connections are counted
    after = allowlisted.egress_denied()
    assert after is not None and after >= denied_before + 2


def test_a_policy_changes_at_once_on_a_running_machine(allowlisted: Machine,
                                                       test_hosts: Path) -> None:
    try:
        allowlisted.set_egress(EgressPolicy.from_json({"deny": [f"{PUBLIC}:{PORT}"]}))
        got = connect_all(allowlisted, [(PUBLIC, PORT), (PUBLIC, OTHER_PORT),
                                        (FORBIDDEN["private-10"], PORT)])
        # deny on top of the default: the public port denied, its neighbour not, the
        # private address back to refused (no longer named)
        assert got == {(PUBLIC, PORT): "", (PUBLIC, OTHER_PORT): f"hi from {PUBLIC}\n",
                       (FORBIDDEN["private-10"], PORT): ""}
        allowlisted.set_egress(None)
        assert connect(allowlisted, PUBLIC, PORT) == f"hi from {PUBLIC}\n"
    finally:
        allowlisted.set_egress(EgressPolicy.from_json(
            {"allow": [f"{PUBLIC}:{PORT}", FORBIDDEN["private-10"]]}))


def test_an_egress_policy_needs_the_tap_network(store: ImageStore, guest: GuestBundle,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_NET_BACKEND", "slirp")
    with pytest.raises(EmberError, match="egress policies need the tap network"):
        boot(store, guest, MachineConfig(egress=EgressPolicy.from_json({"deny": [PUBLIC]})))


# ------------------------------------------------------------------ domain rules

DNS_SERVER = r"""
import socket, sys
import dns.message, dns.rcode, dns.rrset
names = {"allowed.test.", "other.test.", "x.wild.test."}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))  # its own address: answers come from where queries went
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(4096)
    q = dns.message.from_wire(data)
    r = dns.message.make_response(q)
    name = q.question[0].name.to_text().lower()
    if name in names and q.question[0].rdtype == 1:
        r.answer.append(dns.rrset.from_text(name, 60, "IN", "A", sys.argv[1]))
    elif name not in names:
        r.set_rcode(dns.rcode.NXDOMAIN)
    s.sendto(r.to_wire(), peer)
"""


@pytest.fixture(scope="module")
def test_resolver(test_hosts: Path) -> Iterator[str]:
    """A DNS server on the test host (PUBLIC:53) knowing a few names, all at PUBLIC.

    Ember's resolver asks it (EMBER_DNS_UPSTREAM): no real DNS anywhere."""
    site = next((Path(__file__).resolve().parents[3] / ".venv" / "lib")
                .glob("python3*/site-packages"))
    server = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", DNS_SERVER,
                               PUBLIC], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(site)})
    old = os.environ.get("EMBER_DNS_UPSTREAM")
    try:
        assert server.stdout is not None and server.stdout.readline() == b"ready\n"
        os.environ["EMBER_DNS_UPSTREAM"] = f"{PUBLIC}:53"
        import dns.message
        import dns.query

        answer = dns.query.udp(dns.message.make_query("allowed.test", "A"), PUBLIC, timeout=5)
        assert answer.answer, answer  # the test resolver answers the host
        yield PUBLIC
    finally:
        if old is None:
            os.environ.pop("EMBER_DNS_UPSTREAM", None)
        else:
            os.environ["EMBER_DNS_UPSTREAM"] = old
        server.kill()
        server.wait()


def lookup(m: Machine, name: str, server: str = "10.0.2.3") -> str:
    """The guest's busybox nslookup: its output, or "" when it found nothing."""
    p = m.exec(ExecRequest(argv=["/bin/sh", "-c", f"nslookup {name} {server} 2>&1"],
                           env=[PATH]))
    st = m.wait_process(p, timeout=60)
    return p.stdout.decode() if st.exit_code == 0 else ""


def test_domain_rules_allow_what_the_resolver_answered_and_nothing_else(
        store: ImageStore, guest: GuestBundle, test_resolver: str) -> None:
    policy = EgressPolicy.from_json({"allow": [f"allowed.test:{PORT}", "*.wild.test"]})
    m = boot(store, guest, MachineConfig(egress=policy))
    try:
        # nothing resolved yet: the address is not allowed, not even on the rule's port
        assert connect(m, PUBLIC, PORT) == ""
        assert PUBLIC in lookup(m, "allowed.test")
        got = connect_all(m, [(PUBLIC, PORT), (PUBLIC, OTHER_PORT), (PUBLIC, 853)])
        assert got == {(PUBLIC, PORT): f"hi from {PUBLIC}\n",  # the answer, on its port
                       (PUBLIC, OTHER_PORT): "", (PUBLIC, 853): ""}  # no other port, no DoT
        # a name no rule allows is not resolved, and counts as denied
        before = m.egress_denied()
        assert lookup(m, "other.test") == ""
        after = m.egress_denied()
        assert before is not None and after is not None and after > before
        # the guest cannot ask another resolver
        assert lookup(m, "allowed.test", server=PUBLIC) == ""
        # a wildcard allows any name below it, on any port
        assert PUBLIC in lookup(m, "x.wild.test")
        assert connect(m, PUBLIC, OTHER_PORT) == f"hi from {PUBLIC}\n"
    finally:
        m.close()


# ------------------------------------------------------------------ through the daemon


def test_a_daemon_machine_s_policy_is_set_at_create_changed_by_patch_and_denials_are_events(
        daemon: Any, test_hosts: Path) -> None:
    from daemon_api import Events, create, delete, get, run, start

    with daemon.http() as api, Events(daemon, machine="egress-box") as events:
        create(api, name="egress-box", cmd=["sleep", "3600"],
               egress={"allow": [f"{PUBLIC}:{PORT}"]})
        start(api, "egress-box")
        try:
            probe = f"nc -w 3 {PUBLIC} {{}} </dev/null"
            assert run(api, "egress-box", "sh", "-c", probe.format(PORT))["stdout"] == \
                f"hi from {PUBLIC}\n"
            assert run(api, "egress-box", "sh", "-c", probe.format(OTHER_PORT))["stdout"] == ""
            # the watcher turns the firewall's count into an event (it polls every 5 s)
            events.wait_for_machine("egress-box", "egress-denied", timeout=30)
            ev = events.of("egress-denied", "egress-box")[0]
            assert "denied" in (ev.get("detail") or ""), ev
            m = get(api, "egress-box")
            assert m["egress"] == {"allow": [f"{PUBLIC}/32:{PORT}"], "deny": []}
            assert m["egress_denied"] >= 1
            # a bad rule is refused whole, and the policy in force stays
            r = api.patch("/v1/machines/egress-box", json={"egress": {"allow": ["nope:x"]}})
            assert r.status_code == 422 and "nope:x" in r.json()["error"]["message"]
            # cleared on the running machine: the default network again, at once
            r = api.patch("/v1/machines/egress-box", json={"egress": None})
            assert r.status_code == 200, r.text
            assert r.json()["egress"] is None
            assert run(api, "egress-box", "sh", "-c", probe.format(OTHER_PORT))["stdout"] == \
                f"hi from {PUBLIC}\n"
            assert events.of("egress-updated", "egress-box")
        finally:
            delete(api, "egress-box")
