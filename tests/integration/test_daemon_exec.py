"""Exec through a real daemon's API: what a process's client leaving does to it, the
output limits and the stream window, stdin flow control, and the WebSocket's
control messages.

Processes are found in the guest by a unique ``sleep`` argument (``1000.<n>``),
listed through another exec.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import Daemon

#: What ``ember.api.app`` promises (STREAM_WINDOW, the buffered exec's output limit).
WINDOW = 4 << 20
OUTPUT_LIMIT = 64 << 20

_CMDLINES = 'for p in /proc/[0-9]*; do tr "\\0" " " < "$p/cmdline" 2>/dev/null; echo; done'
_markers = itertools.count(os.getpid() % 1000 * 1000)


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.http() as c:
        yield c


#: The box's published port that ``Gate`` uses.
GATE_PORT = 9000


@pytest.fixture(scope="module")
def box(api: httpx.Client) -> Iterator[str]:
    """A running machine for the module (an idle one: a sandbox to exec into)."""
    r = api.post("/v1/machines", json={"image": "sample:latest", "name": "exec-box",
                                       "cmd": ["sleep", "3600"], "cpus": 2,
                                       "ports": [{"guest_port": GATE_PORT}]})
    assert r.status_code == 201, r.text
    r = api.post("/v1/machines/exec-box/start")
    assert r.status_code == 200, r.text
    yield "exec-box"
    api.delete("/v1/machines/exec-box", params={"force": "true"})


def run(api: httpx.Client, name: str, *cmd: str, **extra: Any) -> dict[str, Any]:
    r = api.post(f"/v1/machines/{name}/exec", json={"cmd": list(cmd), **extra})
    assert r.status_code == 200, r.text
    return dict(r.json())


def sleeper() -> list[str]:
    """``sleep 1000.N``: a command that runs until killed, recognisable in the guest."""
    return ["sleep", f"1000.{next(_markers)}"]


def running(api: httpx.Client, name: str, argv: list[str]) -> bool:
    """Whether a process with exactly ``argv`` runs in the guest."""
    res = run(api, name, "sh", "-c", _CMDLINES, user="root")
    return " ".join(argv) + " " in res["stdout"].splitlines()


def wait_running(api: httpx.Client, name: str, argv: list[str], want: bool = True) -> None:
    deadline = time.monotonic() + 60
    while running(api, name, argv) != want:
        assert time.monotonic() < deadline, f"{argv} {'never started' if want else 'lives on'}"
        time.sleep(0.1)


def http_request(daemon: Daemon, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a POST over a socket of our own, whose closing is the client going away."""
    data = json.dumps(body).encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(daemon.socket))
    s.sendall(f"POST {path} HTTP/1.1\r\nhost: ember\r\ncontent-type: application/json\r\n"
              f"content-length: {len(data)}\r\n\r\n".encode() + data)
    return s


# --------------------------------------------------------- a client going away


@pytest.mark.parametrize("how", ["exec", "exec/stream", "exec/ws"])
def test_an_exec_dies_with_its_client(api: httpx.Client, daemon: Daemon, box: str,
                                      how: str) -> None:
    argv = sleeper()
    path = f"/v1/machines/{box}/{how}"
    with contextlib.ExitStack() as stack:
        if how == "exec/ws":
            from websockets.sync.client import unix_connect

            ws = stack.enter_context(unix_connect(str(daemon.socket), f"ws://ember{path}"))
            ws.send(json.dumps({"cmd": argv}))
            sock = ws.socket
        else:
            sock = stack.enter_context(http_request(daemon, path, {"cmd": argv}))
        wait_running(api, box, argv)
        sock.shutdown(socket.SHUT_RDWR)  # gone without a word, as a killed client
        wait_running(api, box, argv, want=False)


class Gate:
    """A guest process waits on the test without the agent channel: it listens on the
    box's published port (``nc -l``) and goes on once the test, connected, hangs up.

    The test knows the process runs when its connection is accepted (before that it
    is refused: nothing listens in the guest yet)."""

    def __init__(self, api: httpx.Client, box: str) -> None:
        (port,) = [p["host_port"] for p in api.get(f"/v1/machines/{box}").json()["ports"]
                   if p["guest_port"] == GATE_PORT]
        self.port = port
        self.conn: socket.socket | None = None

    def wait_in_guest(self) -> str:
        return f"nc -l -p {GATE_PORT} </dev/null >/dev/null"

    def reached(self, timeout: float) -> bool:
        """Whether the guest's process listened (and so ran) within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.conn = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                return True
            except OSError:
                time.sleep(0.1)
        return False

    def open(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        self.open()


def test_a_client_leaving_a_process_that_reads_no_stdin_does_not_stall_the_daemon(
        api: httpx.Client, daemon: Daemon, box: str) -> None:
    """While a process leaves its stdin unread the agent reads nothing from the host, so
    the kill for a client that left waits; the daemon's other requests must not."""
    gate = Gate(api, box)
    marker = sleeper()[1]
    argv = ["sh", "-c", f"{gate.wait_in_guest()}; exec cat >/dev/null", marker]
    try:
        sock = http_request(daemon, f"/v1/machines/{box}/exec/stream",
                            {"cmd": argv, "stdin": "x" * (16 << 20)})  # the most it takes
        assert gate.reached(60), "the process never ran"
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        # a generous timeout, only so that a stalled daemon fails rather than hangs
        assert api.get("/v1/version", timeout=60).status_code == 200
        assert api.get(f"/v1/machines/{box}", timeout=60).json()["state"] == "running"
    finally:
        gate.open()  # the guest reads its stdin: the agent listens again
    try:
        wait_running(api, box, argv, want=False)
    finally:
        gate.close()


# --------------------------------------------------------- output limits


def test_a_client_that_stops_reading_gets_a_window_then_truncated_output(
        api: httpx.Client, box: str) -> None:
    total = 40 << 20
    flag = f"/tmp/produced.{next(_markers)}"
    body = {"cmd": ["sh", "-c", f"head -c {total} /dev/zero; touch {flag}"]}
    got = 0
    end = None
    with api.stream("POST", f"/v1/machines/{box}/exec/stream", json=body) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines))["type"] == "started"
        # This client reads no more for now. Its process cannot write all its output
        # until the daemon gives up on the client (after 10 s without room in the
        # window) and drops the rest; other execs of the machine go on.
        res = run(api, box, "sh", "-c", f"until [ -e {flag} ]; do sleep 0.1; done; echo alive")
        assert res["stdout"] == "alive\n"
        for line in lines:
            ev = json.loads(line)
            if ev["type"] == "stdout":
                got += len(base64.b64decode(ev["data"]))
            else:
                end = ev
    assert end == {"type": "exit", "exit_code": 0, "timed_out": False, "truncated": True}
    assert WINDOW <= got < total  # what was in flight reached it, the rest was dropped


def test_a_buffered_exec_keeps_64_mib_of_a_stream(api: httpx.Client, box: str) -> None:
    res = run(api, box, "sh", "-c",
              f"head -c {OUTPUT_LIMIT + 100_000} /dev/zero | tr '\\0' a; echo done >&2")
    assert (res["exit_code"], res["truncated"], res["stderr"]) == (0, True, "done\n")
    assert len(res["stdout"]) == OUTPUT_LIMIT and set(res["stdout"]) == {"a"}


# --------------------------------------------------------- the WebSocket


def test_the_websocket_signal_message_reaches_the_process(daemon: Daemon, box: str) -> None:
    from websockets.sync.client import unix_connect

    # SIGWINCH: a number no kill uses, ignored by default (the shell's `sleep` lives on)
    script = "trap 'echo caught; exit 5' WINCH; echo ready; while :; do sleep 0.1; done"
    with unix_connect(str(daemon.socket), f"ws://ember/v1/machines/{box}/exec/ws") as ws:
        ws.send(json.dumps({"cmd": ["sh", "-c", script]}))
        out = b""
        while b"ready\n" not in out:
            msg = ws.recv(timeout=60)
            assert isinstance(msg, bytes), msg
            out += msg[1:]
        ws.send(json.dumps({"type": "signal", "signal": signal.SIGWINCH}))
        while isinstance(msg := ws.recv(timeout=60), bytes):
            out += msg[1:]
    assert out == b"ready\ncaught\n"
    assert json.loads(msg) == {"type": "exit", "exit_code": 5, "signal": None,
                               "timed_out": False}


def test_websocket_stdin_of_any_size_with_bounded_daemon_memory(
        daemon: Daemon, box: str) -> None:
    """50 MB through a slow reader: the sender waits, the daemon holds a bounded amount."""
    import hashlib

    from websockets.sync.client import unix_connect

    assert daemon.proc is not None
    pid = daemon.proc.pid
    chunk = os.urandom(1 << 20)
    digest = hashlib.sha256(chunk * 50).hexdigest()
    base = reset_peak_rss(pid)
    with unix_connect(str(daemon.socket), f"ws://ember/v1/machines/{box}/exec/ws",
                      compression=None) as ws:
        ws.send(json.dumps({"cmd": ["sh", "-c", "sleep 2; exec sha256sum"]}))
        for _ in range(50):
            for i in range(0, len(chunk), 256 << 10):
                ws.send(chunk[i:i + (256 << 10)])
        ws.send(json.dumps({"type": "eof"}))
        out = b""
        while isinstance(msg := ws.recv(timeout=120), bytes):
            out += msg[1:]
    assert json.loads(msg)["exit_code"] == 0
    assert out.decode().split() == [digest, "-"]
    assert peak_rss(pid) - base < 24 << 20  # far less than the 50 MB that went through


def peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmHWM")


def reset_peak_rss(pid: int) -> int:
    """Reset the peak (``clear_refs`` 5) to the current RSS, and return it."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return peak_rss(pid)
