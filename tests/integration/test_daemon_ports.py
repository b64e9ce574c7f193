"""Published host ports that are taken: by another machine, or by a plain host socket (409)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest
from daemon_api import create, delete, get, machine, start

if TYPE_CHECKING:
    from conftest import Daemon


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.http() as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def conflict(r: httpx.Response) -> str:
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["error"]["code"] == "conflict", body
    return str(body["error"]["message"])


def test_two_machines_cannot_publish_the_same_host_port(api: httpx.Client) -> None:
    port = free_port()
    ports = [{"guest_port": 80, "host_port": port}]
    with machine(api, name="port-a", cmd=["sleep", "3600"], ports=ports), \
            machine(api, name="port-b", cmd=["sleep", "3600"], ports=ports):
        a = start(api, "port-a")
        assert a["ports"][0]["host_port"] == port
        msg = conflict(api.post("/v1/machines/port-b/start"))
        assert f"127.0.0.1:{port}" in msg and "another machine" in msg, msg
        b = get(api, "port-b")
        assert b["state"] not in ("starting", "running", "paused") and b["pid"] is None
        assert get(api, "port-a")["state"] == "running"  # the first one is untouched
        # once the first machine lets the port go, the second one gets it
        assert api.post("/v1/machines/port-a/stop", params={"timeout": 0}).status_code == 200
        assert start(api, "port-b")["ports"][0]["host_port"] == port


def test_a_host_port_held_by_a_host_socket_is_a_409(api: httpx.Client) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with machine(api, name="port-c", cmd=["sleep", "3600"],
                     ports=[{"guest_port": 80, "host_port": port}]):
            msg = conflict(api.post("/v1/machines/port-c/start"))
            assert f"127.0.0.1:{port}" in msg and "in use" in msg, msg
            assert get(api, "port-c")["pid"] is None
            holder.close()  # the port is free again: the machine starts
            assert start(api, "port-c")["ports"][0]["host_port"] == port


def test_a_machine_stopped_by_a_conflict_is_not_left_half_started(api: httpx.Client,
                                                                  daemon: Daemon) -> None:
    # nothing of the refused boot remains: no QEMU, no state directory of its boot
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        m = create(api, name="port-d", cmd=["sleep", "3600"],
                   ports=[{"guest_port": 80, "host_port": port}])
        try:
            conflict(api.post("/v1/machines/port-d/start"))
            state_dir = daemon.home / "machines" / "daemon" / m["id"] / "port-d"
            assert not (state_dir / "qemu.pid").exists()
        finally:
            delete(api, "port-d")
