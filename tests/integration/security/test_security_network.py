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

import pytest

from ember import paths
from ember.agent.protocol import ExecRequest
from ember.guest.bundle import GuestBundle
from ember.host.probe import choose_accel
from ember.images import ImageStore
from ember.machine import Machine, MachineConfig
from ember.vmm import parse_port
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

SERVER = r"""
import socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(64)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    here = c.getsockname()[0]
    log.write(f"{here} {peer[0]}\n")
    c.sendall(f"hi from {here}\n".encode()); c.close()
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
                               str(log), str(PORT)], stdout=subprocess.PIPE)
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


def boot(store: ImageStore, guest: GuestBundle, config: MachineConfig) -> Machine:
    m = Machine.create(machines_dir=paths.machines_dir(), guest=guest,
                       rootfs=store.rootfs(store.resolve("sample:latest")),
                       accel=choose_accel(None), config=config)
    try:
        m.start()
    except BaseException:
        m.close()
        raise
    return m


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
