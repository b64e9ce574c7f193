"""``ember serve`` as a process: its lock, its TCP listener and token, and the clients'
on-demand start of it (real daemons, each in a data dir of its own, so the session's
daemon of conftest.py is not disturbed)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

import ember
from ember.sdk import MachineHandle
from ember.sdk import daemon as sdk_daemon

#: Seconds a daemon gets to come up or go; generous for a loaded two-core host.
UP = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("EMBER_HOST", "EMBER_TOKEN")}
    return {**env, "EMBER_HOME": str(home), **extra}


class Serve:
    """A real ``ember serve`` on ``home``, its stderr kept apart."""

    def __init__(self, home: Path, *args: str, **env: str) -> None:
        self.home = home
        self.socket = home / "ember.sock"
        self.stderr = home / f"serve-{len(list(home.glob('serve-*')))}.stderr"
        home.mkdir(parents=True, exist_ok=True)
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "ember", "serve", *args],
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                         env=env_for(home, **env), start_new_session=True)
        deadline = time.monotonic() + UP
        while not sdk_daemon.answers(self.socket, timeout=1.0):
            assert self.proc.poll() is None, f"ember serve exited: {self.err()}"
            assert time.monotonic() < deadline, f"ember serve did not answer: {self.err()}"
            time.sleep(0.05)

    def err(self) -> str:
        return self.stderr.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(UP)


@pytest.fixture
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("h")  # short: a socket path has 107 bytes


def stop_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    for proc in sdk_daemon._spawned:  # ours: reap it
        if proc.pid == pid:
            proc.wait(UP)


# ------------------------------------------------------------------ the lock


def test_a_second_daemon_on_the_same_data_dir_is_refused(home: Path) -> None:
    first = Serve(home)
    try:
        second = subprocess.run([sys.executable, "-m", "ember", "serve"], capture_output=True,
                                env=env_for(home), timeout=UP, stdin=subprocess.DEVNULL)
        assert second.returncode == 125
        assert second.stderr.decode().splitlines() == [
            f"ember: error: another ember daemon (pid {first.proc.pid}) is running for "
            f"{home} (it holds {home / 'daemon.pid'})"]
        assert sdk_daemon.answers(first.socket)  # and the first one goes on, socket and all
    finally:
        first.stop()


# ------------------------------------------------------------------ TCP


def test_tcp_token_file_listener_message_and_auth(home: Path) -> None:
    port = free_port()
    d = Serve(home, "--tcp", f"127.0.0.1:{port}", "--insecure-tcp")
    try:
        token_file = home / "token"
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        token = token_file.read_text().strip()
        assert len(token) >= 32
        line = (f"ember daemon listening on {home / 'ember.sock'} and http://127.0.0.1:{port} "
                f"(bearer token from {token_file} (created))")
        assert line in d.err().splitlines()
        assert any(ln.endswith(f"--insecure-tcp: http://127.0.0.1:{port} is plain HTTP, "
                               "without TLS: the bearer token and all traffic cross the "
                               "network unencrypted") for ln in d.err().splitlines())
        assert token not in d.err()
        base = f"http://127.0.0.1:{port}"
        r = httpx.get(f"{base}/v1/version")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"error": {"code": "unauthorized",
                                      "message": "missing or wrong bearer token"}}
        r = httpx.get(f"{base}/v1/version", headers={"Authorization": f"Bearer {token}x"})
        assert r.status_code == 401
        r = httpx.get(f"{base}/v1/version", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["api"] == "v1"
        assert sdk_daemon.answers(d.socket)  # the owner's Unix socket needs none
        assert oct(d.socket.stat().st_mode & 0o777) == "0o600"

        # A WebSocket without the token (or with a wrong one) is closed with 1008.
        url = f"ws://127.0.0.1:{port}/v1/machines/ghost/exec/ws"
        for headers in ({}, {"Authorization": "Bearer nope"}):
            with ws_connect(url, additional_headers=headers, open_timeout=UP) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(timeout=UP)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                1008, "missing or wrong bearer token")
        # with it, the request reaches the API
        with ws_connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                        open_timeout=UP) as ws:
            ws.send(json.dumps({"cmd": ["true"]}))
            assert json.loads(ws.recv(timeout=UP))["message"] == "no machine named 'ghost'"
    finally:
        d.stop()
    # the file's token is kept; --token and $EMBER_TOKEN are named as the source
    d = Serve(home, "--tcp", f"127.0.0.1:{port}", "--insecure-tcp")
    d.stop()
    assert f"(bearer token from {home / 'token'})" in d.err()
    assert (home / "token").read_text().strip() == token
    d = Serve(home, "--tcp", f"127.0.0.1:{port}", "--insecure-tcp", "--token", "given-secret")
    d.stop()
    assert "(bearer token from --token)" in d.err() and "given-secret" not in d.err()
    d = Serve(home, "--tcp", f"127.0.0.1:{port}", "--insecure-tcp", EMBER_TOKEN="env-secret")
    d.stop()
    assert "(bearer token from $EMBER_TOKEN)" in d.err() and "env-secret" not in d.err()


@pytest.fixture
def tcp_daemon(home: Path, guest: Any, sample_layout: Path) -> Iterator[tuple[str, str]]:
    """A daemon on a free TCP port holding sample:latest: (``EMBER_HOST``, token)."""
    from ember.vmm.process import kill_strays

    port = free_port()
    d = Serve(home, "--tcp", f"127.0.0.1:{port}", "--insecure-tcp", "--token", "tcp-secret")
    host = f"http://127.0.0.1:{port}"
    try:
        with ember.Client(base_url=host, token="tcp-secret") as c:
            c.images.import_path(sample_layout, tag="sample:latest")
        yield host, "tcp-secret"
        with ember.Client(d.socket) as c:
            for m in c.machines.list():
                m.remove(force=True)
    finally:
        d.stop()
        for state_dir in home.glob("machines/daemon/*/*"):
            kill_strays(state_dir)


def test_the_cli_over_tcp(tcp_daemon: tuple[str, str], tmp_path: Path) -> None:
    host, token = tcp_daemon
    # EMBER_HOME is elsewhere, empty: everything goes over TCP, and nothing is started
    env = env_for(tmp_path / "elsewhere", EMBER_HOST=host, EMBER_TOKEN=token)

    def ember_cli(*args: str, stdin: bytes | None = None,
                  **extra: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "ember", *args], capture_output=True,
                              input=stdin if stdin is not None else b"", timeout=300,
                              env={**env, **extra})

    r = ember_cli("run", "-d", "--name", "remote", "sample:latest", "--", "sleep", "3600")
    assert r.returncode == 0, r.stderr.decode()
    r = ember_cli("ps")
    assert r.returncode == 0 and "remote" in r.stdout.decode().split()
    r = ember_cli("exec", "remote", "--", "sh", "-c", "echo over tcp; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"over tcp\n", b"err\n")
    r = ember_cli("exec", "-i", "remote", "--", "cat", stdin=b"through the websocket")
    assert (r.returncode, r.stdout) == (0, b"through the websocket"), r.stderr.decode()
    r = ember_cli("version", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["daemon"]["address"] == host
    client_line, daemon_line = ember_cli("version").stdout.decode().splitlines()
    assert client_line.startswith(f"client: ember {ember.__version__}, API v1, Python ")
    assert daemon_line.startswith(f"daemon: ember {ember.__version__}, API v1, accelerator ")
    assert daemon_line.endswith(f", at {host}")
    # a wrong token: one line, 125
    for args in (("ps",), ("exec", "-i", "remote", "--", "cat")):
        r = ember_cli(*args, stdin=b"x", EMBER_TOKEN="wrong")
        assert (r.returncode, r.stderr) == (125, b"ember: error: missing or wrong bearer token\n")
    assert not (tmp_path / "elsewhere").exists()
    # and an exec session refused for its token says so (the WebSocket's close reason)
    with ember.Client(base_url=host, token=token) as good:
        info = good.machines.get("remote").info
    with ember.Client(base_url=host, token="wrong") as bad, \
            MachineHandle(bad, info).exec_session(["cat"]) as session:
        assert [ev.type for ev in session] == ["error"]
    assert session.result is not None and session.result.message == (
        "the daemon refused the exec session: missing or wrong bearer token")


# ------------------------------------------------------------------ starting on demand


def test_the_sdk_starts_the_real_daemon_on_demand(home: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_HOME", str(home))
    monkeypatch.delenv("EMBER_HOST", raising=False)
    with ember.Client.connect_or_start() as c:
        assert c.version().api == "v1"
    pid = sdk_daemon.daemon_pid(home)
    assert pid, "no daemon holds daemon.pid"
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:4] == [b"-m", b"ember", b"serve"]
        assert os.getsid(pid) == pid  # its own session: a Ctrl-C here does not reach it
        log = (home / "daemon.log").read_text()
        assert f"started on demand by pid {os.getpid()}" in log
        assert f"ember daemon listening on {home / 'ember.sock'}" in log
        with ember.Client() as c:  # and later clients find it
            assert c.version().api == "v1"
    finally:
        stop_pid(pid)


def test_connect_or_start_outwaits_a_daemon_that_is_shutting_down(home: Path,
                                                                 monkeypatch: Any) -> None:
    monkeypatch.setenv("EMBER_HOME", str(home))
    monkeypatch.delenv("EMBER_HOST", raising=False)
    old = Serve(home)
    transport = httpx.HTTPTransport(uds=str(old.socket))
    with httpx.Client(transport=transport, base_url="http://ember", timeout=UP) as c, \
            c.stream("GET", "/v1/events") as stream:  # a follower keeps it from exiting
        assert stream.status_code == 200
        old.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + UP
        while sdk_daemon.connectable(old.socket):  # until its listener is closed
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert sdk_daemon.daemon_pid(home) == old.proc.pid  # shutting down, not gone
        with ember.Client.connect_or_start() as client:
            assert client.version().api == "v1"
        new = sdk_daemon.daemon_pid(home)
    try:
        assert old.proc.poll() is not None  # the old one had to go first
        assert new and new != old.proc.pid
        with ember.Client() as client:
            assert client.version().api == "v1"
    finally:
        if new:
            stop_pid(new)
        old.stop()
