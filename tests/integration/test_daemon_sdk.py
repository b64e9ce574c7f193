"""The SDK against a real daemon and real microVMs, sync and async."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

import ember
from ember.sdk import Conflict, InvalidRequest, MachineHandle, NotFound

if TYPE_CHECKING:
    from conftest import Daemon


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[ember.Client]:
    with ember.Client(daemon.socket) as c:
        yield c


@pytest.fixture(scope="module")
def box(client: ember.Client) -> Iterator[MachineHandle]:
    """One running machine for the module; it prints a line, then idles."""
    with client.machines.create("sample:latest", name="sdk-box", cpus=2, env={"WHO": "sdk"},
                                cmd=["sh", "-c", "echo main says hi; exec sleep 3600"],
                                ports=["80"]) as m:
        yield m


def test_create_returns_a_running_machine_with_its_record(box: MachineHandle) -> None:
    assert box.state == "running" and box.name == "sdk-box"
    assert box.info.cpus == 2 and box.info.env == {"WHO": "sdk"}
    (port,) = box.ports
    assert port.guest_port == 80 and port.host_port > 0 and port.host_ip == "127.0.0.1"


def test_exec_returns_exit_code_output_and_takes_stdin(box: MachineHandle) -> None:
    res = box.exec(["sh", "-c", "echo $WHO; cat; echo err >&2; exit 3"], stdin="fed in\n")
    assert (res.exit_code, res.stdout, res.stderr) == (3, "sdk\nfed in\n", "err\n")
    assert box.exec(["nosuch"]).exit_code == 127


def test_exec_stream_delivers_bytes_as_they_come(box: MachineHandle) -> None:
    events = list(box.exec_stream(["sh", "-c", "printf '\\377a'; sleep 0.3; "
                                   "printf b >&2; exit 4"]))
    assert events[0].type == "started" and events[0].pid
    assert b"".join(e.data for e in events if e.type == "stdout") == b"\xffa"
    assert b"".join(e.data for e in events if e.type == "stderr") == b"b"
    assert (events[-1].type, events[-1].exit_code) == ("exit", 4)


def test_files_round_trip(box: MachineHandle) -> None:
    box.put_file("/srv/new/conf.txt", b"k=v\n", mode=0o600)
    assert box.get_file("/srv/new/conf.txt") == b"k=v\n"
    assert box.exec(["stat", "-c", "%a %U", "/srv/new/conf.txt"]).stdout == "600 root\n"
    with pytest.raises(NotFound):
        box.get_file("/no/such/file")


def test_logs_and_events(client: ember.Client, box: MachineHandle) -> None:
    deadline = time.monotonic() + 10
    while b"main says hi" not in b"".join(box.logs()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert b"".join(box.logs(tail=1)) == b"main says hi\n"
    kinds = [e.type for e in client.events(since=0, follow=False) if e.machine == box.name]
    assert kinds[:2] == ["created", "starting"] and "started" in kinds


def test_errors_carry_the_apis_message(client: ember.Client, box: MachineHandle) -> None:
    with pytest.raises(NotFound, match="nope"):
        client.machines.get("nope")
    with pytest.raises(Conflict):
        client.machines.create("sample:latest", name=box.name, start=False)
    with pytest.raises(Conflict, match="running"):
        box.remove()
    with pytest.raises(NotFound):
        client.machines.create("no-such-image:1")
    with pytest.raises(InvalidRequest):
        client.machines.create("sample:latest", memory_mib=1)


def test_exec_session_gives_a_terminal_and_live_stdin(box: MachineHandle) -> None:
    with box.exec_session(["sh", "-c", "tty; read line; echo got $line; exit 6"],
                          tty=True) as s:
        s.send(b"hello\n")
        out = b"".join(e.data for e in s if e.type == "stdout")
    assert s.result is not None and s.result.exit_code == 6
    assert b"/dev/pts/" in out and b"got hello" in out


def test_lifecycle_and_cleanup_on_exit(client: ember.Client) -> None:
    with client.machines.create("sample:latest", cmd=["sleep", "600"]) as m:
        assert m.pause().state == "paused"
        assert m.resume().state == "running"
        assert m.stop(timeout=1).state == "stopped"
        assert m.refresh().exit_code is not None
        name = m.name
    with pytest.raises(NotFound):
        client.machines.get(name)


def test_the_async_client(daemon: Daemon, box: MachineHandle) -> None:
    async def main() -> tuple[int, bytes, list[str]]:
        async with ember.AsyncClient(daemon.socket) as c:
            m = await c.machines.get(box.name)
            res = await m.exec(["sh", "-c", "exit 5"])
            out = b"".join([e.data async for e in m.exec_stream(["echo", "async"])])
            names = [x.name for x in await c.machines.list(all=False)]
            return res.exit_code, out, names

    code, out, names = asyncio.run(main())
    assert (code, out) == (5, b"async\n") and box.name in names
