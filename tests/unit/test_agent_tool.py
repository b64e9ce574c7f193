"""The agent's tool (TOOL frames, EXEC ``"tool": true``) with the real C agent in test mode.

The host's static busybox is the tool, as in a guest: memfd_create and
execveat work the same on the host.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent_host import Running, T, start_agent

import ember.guest.agent as agent_builder
from ember.agent.client import AgentClient, ExecFailed
from ember.agent.protocol import (
    MAX_TOOL_SIZE,
    ExecRequest,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    json_frame,
    json_payload,
)
from ember.errors import AgentError
from ember.files import host_busybox

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


@pytest.fixture(scope="module")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agent_builder.build_agent(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def busybox() -> bytes:
    return host_busybox().read_bytes()


@pytest.fixture
def running(agent_bin: Path) -> Iterator[Running]:
    with start_agent(agent_bin) as r:
        yield r


@pytest.fixture
def client(running: Running) -> Iterator[AgentClient]:
    c = AgentClient(running.sock)
    c.hello(T)
    yield c
    c.close()


def tool_run(c: AgentClient, argv: list[str], **kw: object) -> tuple[int, bytes, bytes]:
    p = c.exec(ExecRequest(argv, tool=True, **kw))  # type: ignore[arg-type]
    return p.wait(T).exit_code, p.stdout, p.stderr


class Raw:
    """The agent's side of the protocol frame by frame, for what AgentClient never sends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(T)
        self.decoder = FrameDecoder()
        self.pending: list[Frame] = []

    def send(self, frame: Frame) -> None:
        self.sock.sendall(encode_frame(frame))

    def recv(self) -> Frame:
        while not self.pending:
            data = self.sock.recv(1 << 16)
            assert data, "the agent hung up"
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def load(self, data: bytes) -> dict[str, object]:
        for i in range(0, len(data), 1 << 16):
            self.send(Frame(FrameType.TOOL, 0, data[i:i + (1 << 16)]))
        self.send(Frame(FrameType.TOOL, 0, b""))
        frame = self.recv()
        assert frame.type is FrameType.TOOL_STATUS and frame.channel == 0
        return json_payload(frame)

    def hello(self) -> dict[str, object]:
        self.send(json_frame(FrameType.HELLO, 0, {"version": 1}))
        frame = self.recv()
        assert frame.type is FrameType.READY
        return json_payload(frame)


def test_the_loaded_tool_runs_its_applets_from_a_memfd(client: AgentClient,
                                                       busybox: bytes) -> None:
    assert not client.tool_loaded
    client.load_tool(busybox)
    assert client.tool_loaded
    assert tool_run(client, ["echo", "hello"]) == (0, b"hello\n", b"")
    code, out, _ = tool_run(client, ["readlink", "/proc/self/exe"])
    assert code == 0 and out.startswith(b"/memfd:ember-tool")
    # Its shell finds applets without any PATH, as in an image without them.
    code, out, err = tool_run(client, ["sh", "-c", "tar --help 2>&1 | head -n 2; exec true"],
                              env=["PATH=/nonexistent"])
    assert (code, err) == (0, b"") and b"BusyBox" in out
    # An unknown applet is the tool's own error.
    code, _, err = tool_run(client, ["no-such-applet"])
    assert code == 127 and b"applet not found" in err


def test_the_tool_is_sealed_and_the_agent_holds_it_read_only(client: AgentClient,
                                                             running: Running,
                                                             busybox: bytes) -> None:
    client.load_tool(busybox)
    fd_dir = Path(f"/proc/{running.proc.pid}/fd")
    held = [fd for fd in fd_dir.iterdir() if os.readlink(fd).startswith("/memfd:ember-tool")]
    assert len(held) == 1  # the writable fd it was loaded through is closed
    (fd,) = held
    flags = next(line for line in (fd_dir.parent / "fdinfo" / fd.name).read_text().splitlines()
                 if line.startswith("flags:"))
    assert int(flags.split()[1], 8) & os.O_ACCMODE == os.O_RDONLY
    with open(fd, "rb") as f:  # the memfd itself, reopened
        seals = fcntl.fcntl(f.fileno(), fcntl.F_GET_SEALS)
        assert seals == (fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW |
                         fcntl.F_SEAL_WRITE)
        assert f.read() == busybox
    # so not even its owner can change it (we may well be root)...
    with open(fd, "r+b", buffering=0) as f:
        with pytest.raises(PermissionError):
            f.write(b"\0")
        with pytest.raises(PermissionError):
            f.truncate(0)
    # ...and a tool process runs that very file
    p = client.exec(ExecRequest(["sleep", "100"], tool=True))
    pid = p.wait_started(T)
    try:
        assert os.stat(f"/proc/{pid}/exe").st_ino == os.stat(fd).st_ino
    finally:
        p.signal(9)
        p.wait(T)


def test_a_second_load_sends_nothing_and_hello_reports_the_tool(client: AgentClient,
                                                               busybox: bytes) -> None:
    client.load_tool(busybox)
    client.load_tool(b"not even an ELF file")  # idempotent per connection: not sent
    assert client.hello(T).tool is True
    assert tool_run(client, ["true"])[0] == 0


def test_exec_tool_without_a_tool_is_127(client: AgentClient) -> None:
    p = client.exec(ExecRequest(["tar", "--help"], tool=True))
    with pytest.raises(ExecFailed, match="no tool is loaded") as info:
        p.wait(T)
    assert info.value.code == 127


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (user switching)")
def test_the_tool_runs_as_another_user(client: AgentClient, busybox: bytes) -> None:
    client.load_tool(busybox)
    assert tool_run(client, ["id", "-u"], user="65534:65534") == (0, b"65534\n", b"")


def test_bad_loads_are_refused_and_keep_the_previous_tool(running: Running,
                                                          busybox: bytes) -> None:
    raw = Raw(running.sock)
    assert raw.hello()["tool"] is False
    assert raw.load(b"#!/bin/sh\necho hi\n") == {
        "loaded": False, "size": 18, "message": "the tool is not an ELF executable"}
    assert raw.load(b"") == {"loaded": False, "size": 0, "message": "the tool is empty"}
    assert raw.hello()["tool"] is False
    assert raw.load(busybox) == {"loaded": True, "size": len(busybox)}
    too_big = busybox + b"\0" * (MAX_TOOL_SIZE - len(busybox) + 1)
    status = raw.load(too_big)
    assert status["loaded"] is False and "exceeds" in str(status["message"])
    assert raw.hello()["tool"] is True
    # TOOL belongs on channel 0
    raw.send(Frame(FrameType.TOOL, 7, b"x"))
    frame = raw.recv()
    assert (frame.type, frame.channel) == (FrameType.ERROR, 0)
    # the previous (good) tool still runs
    raw.send(Frame(FrameType.EXEC, 3, ExecRequest(["echo", "ok"], tool=True).to_payload()))
    types = []
    while not types or types[-1] not in (FrameType.EXIT, FrameType.ERROR):
        f = raw.recv()
        types.append(f.type)
        if f.type is FrameType.STDOUT:
            assert f.payload == b"ok\n"
    assert types[-1] is FrameType.EXIT


def test_a_new_hello_forgets_a_half_done_load(running: Running, busybox: bytes) -> None:
    raw = Raw(running.sock)
    raw.hello()
    raw.send(Frame(FrameType.TOOL, 0, busybox[:1000]))
    raw.hello()  # a new session: the half load is dropped
    assert raw.load(busybox) == {"loaded": True, "size": len(busybox)}


def test_load_tool_refuses_what_the_agent_would(client: AgentClient) -> None:
    with pytest.raises(AgentError, match="refused the tool: the tool is not an ELF"):
        client.load_tool(b"hello")
    with pytest.raises(ValueError):
        client.load_tool(b"")
    assert not client.tool_loaded


def test_tool_fields_on_the_wire() -> None:
    import json

    from ember.agent.protocol import ReadyInfo, ToolStatus
    assert json.loads(ExecRequest(["tar"], tool=True).to_payload())["tool"] is True
    assert "tool" not in json.loads(ExecRequest(["tar"]).to_payload())  # as before TOOL
    assert ReadyInfo.from_payload({"version": 1, "tool": True}).tool is True
    assert ReadyInfo.from_payload({"version": 1}).tool is None  # an older agent
    assert ToolStatus.from_payload({"loaded": False, "size": 3, "message": "no"}) == \
        ToolStatus(False, 3, "no")
