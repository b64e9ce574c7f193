"""The real C agent in test mode (``--serve-fd``), driven by AgentClient; the builder.

No VM: the agent serves the protocol on one end of a socketpair. Every wait
has a timeout, so a broken agent fails the test instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ember.guest.agent as agent_builder
import ember.util
from ember.agent.client import AgentClient, ExecFailed, ProcessTimeout
from ember.agent.protocol import (
    MAX_CHANNEL,
    MAX_PAYLOAD,
    ExecRequest,
    ExitStatus,
    Frame,
    FrameDecoder,
    FrameType,
    encode_frame,
    json_frame,
    json_payload,
)
from ember.errors import AgentDisconnected, HostError, ProtocolError

T = 10.0  # the timeout of every wait

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (user switching)")


@pytest.fixture(scope="module")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agent_builder.build_agent(tmp_path_factory.mktemp("cache"))


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    sock: socket.socket


@contextlib.contextmanager
def start_agent(agent_bin: Path) -> Iterator[Running]:
    host, guest = socket.socketpair()
    proc = subprocess.Popen([str(agent_bin), "--serve-fd", str(guest.fileno())],
                            pass_fds=[guest.fileno()], stdin=subprocess.DEVNULL)
    guest.close()
    try:
        yield Running(proc, host)
    finally:
        with contextlib.suppress(OSError):
            host.close()
        try:
            proc.wait(T)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("the agent did not exit when its host hung up") from None


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


def run(c: AgentClient, argv: list[str], **kw: object) -> tuple[ExitStatus, bytes, bytes]:
    p = c.exec(ExecRequest(argv, **kw))  # type: ignore[arg-type]
    status = p.wait(T)
    return status, p.stdout, p.stderr


def sh(c: AgentClient, script: str, **kw: object) -> tuple[ExitStatus, bytes, bytes]:
    return run(c, ["/bin/sh", "-c", script], **kw)


# ----------------------------------------------------------------- basics


def test_hello_ready(running: Running) -> None:
    with AgentClient(running.sock) as c:
        info = c.hello(T)
        assert info.version == 1
        assert info.agent.startswith("ember-agent/")
        assert info.kernel == os.uname().release
        assert info.uptime_ms > 0
        assert c.hello(T).version == 1  # a second HELLO gets a second READY


def test_ready_lists_the_live_channels_up_to_300(running: Running) -> None:
    """A reconnecting host learns from READY which processes still run; past 300 the
    list is left out (unknown, not empty), and the longest ids still fit."""
    c = AgentClient(running.sock, first_channel=MAX_CHANNEL - 400)  # ten digits each
    c.hello(T)
    procs = []
    try:
        for _ in range(300):
            procs.append(c.exec(ExecRequest(["sleep", "1000"], stdin=False)))
        for p in procs:
            p.wait_started(T)
        assert sorted(c.hello(T).extra["channels"]) == sorted(p.channel for p in procs)
        procs.append(c.exec(ExecRequest(["sleep", "1000"], stdin=False)))
        procs[-1].wait_started(T)
        ready = c.hello(T)
        assert ready.version == 1 and "channels" not in ready.extra
        gone = procs.pop(0)
        gone.signal(signal.SIGKILL)
        gone.wait(T)
        assert sorted(c.hello(T).extra["channels"]) == sorted(p.channel for p in procs)
    finally:
        for p in procs:
            p.signal(signal.SIGKILL)
        for p in procs:
            p.wait(T)
        c.close()


def test_echo(client: AgentClient) -> None:
    assert sh(client, "echo hello") == (ExitStatus(code=0), b"hello\n", b"")


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_codes(client: AgentClient, code: int) -> None:
    status, _, _ = sh(client, f"exit {code}")
    assert status == ExitStatus(code=code)
    assert status.exit_code == code


def test_killed_by_a_signal(client: AgentClient) -> None:
    status, _, _ = sh(client, "kill -TERM $$")
    assert status.signal == 15 and status.code is None
    assert status.exit_code == 143


def test_stdout_and_stderr_are_separate(client: AgentClient) -> None:
    status, out, err = sh(client, "echo out; echo err >&2; echo out2")
    assert (out, err) == (b"out\nout2\n", b"err\n")


def test_started_gives_the_pid(client: AgentClient) -> None:
    p = client.exec(ExecRequest(["/bin/sh", "-c", "echo $$"]))
    pid = p.wait_started(T)
    p.wait(T)
    assert p.pid == pid == int(p.stdout)


def test_stdin_is_piped_through_with_eof(client: AgentClient) -> None:
    data = os.urandom(3 << 20)
    p = client.exec(ExecRequest(["cat"]))
    p.write_stdin(data)
    p.close_stdin()
    assert p.wait(T) == ExitStatus(code=0)
    assert p.stdout == data


def test_stdin_back_pressure_on_a_slow_reader(client: AgentClient) -> None:
    """8 MiB into a process that reads nothing for a while: slowed, never lost."""
    data = os.urandom(8 << 20)
    p = client.exec(ExecRequest(["/bin/sh", "-c", "sleep 0.5; sha256sum"]))
    p.write_stdin(data)
    p.close_stdin()
    assert p.wait(T) == ExitStatus(code=0)
    assert p.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_no_stdin_means_dev_null(client: AgentClient) -> None:
    assert run(client, ["cat"], stdin=False) == (ExitStatus(code=0), b"", b"")


def test_ten_mib_of_output_byte_exact(client: AgentClient, tmp_path: Path) -> None:
    blob = os.urandom(10 << 20)
    (tmp_path / "blob").write_bytes(blob)
    status, out, _ = run(client, ["cat", str(tmp_path / "blob")])
    assert status.code == 0
    assert hashlib.sha256(out).digest() == hashlib.sha256(blob).digest()

    chunks: list[bytes] = []
    p = client.exec(ExecRequest(["cat", str(tmp_path / "blob")]), on_stdout=chunks.append)
    assert p.wait(T).code == 0
    assert b"".join(chunks) == blob and p.stdout == b""
    assert max(len(c) for c in chunks) <= 64 * 1024


def test_concurrent_processes_on_one_connection(client: AgentClient) -> None:
    procs = [client.exec(ExecRequest(["/bin/sh", "-c", f"yes {i} | head -n 20000; exit {i}"]))
             for i in range(8)]
    assert len({p.channel for p in procs}) == 8
    for i, p in enumerate(procs):
        assert p.wait(T) == ExitStatus(code=i)
        assert p.stdout == f"{i}\n".encode() * 20000


def test_env_is_exactly_the_given_one_plus_path_and_home(client: AgentClient) -> None:
    status, out, _ = run(client, ["/usr/bin/env"], env=["A=1", "B=two words"])
    assert sorted(out.decode().splitlines()) == sorted(
        ["A=1", "B=two words", "HOME=/root",
         "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
    _, out, _ = run(client, ["/usr/bin/env"], env=["HOME=/x", "PATH=/bin"])
    assert sorted(out.decode().splitlines()) == ["HOME=/x", "PATH=/bin"]


def test_cwd(client: AgentClient, tmp_path: Path) -> None:
    _, out, _ = run(client, ["pwd"], cwd=str(tmp_path))
    assert out.decode().strip() == str(tmp_path)
    _, out, _ = run(client, ["pwd"])
    assert out == b"/\n"


def test_path_is_searched_in_the_process_env(client: AgentClient, tmp_path: Path) -> None:
    tool = tmp_path / "bin" / "ember-test-tool"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\necho found me\n")
    tool.chmod(0o755)
    _, out, _ = run(client, ["ember-test-tool"], env=[f"PATH=/nonexistent:{tool.parent}"])
    assert out == b"found me\n"
    with pytest.raises(ExecFailed) as ei:
        run(client, ["sh", "-c", "true"], env=["PATH=/nonexistent"])
    assert ei.value.code == 127


def test_unicode_and_escapes_survive_the_json(client: AgentClient) -> None:
    arg = 'é😀"\\\n\t\x01/end'
    _, out, _ = run(client, ["printf", "%s", arg])
    assert out == arg.encode()


# ----------------------------------------------------------------- exec failures


def test_missing_program_is_127(client: AgentClient) -> None:
    with pytest.raises(ExecFailed) as ei:
        run(client, ["no-such-program-xyz"])
    assert ei.value.code == 127 and "no-such-program-xyz" in str(ei.value)
    with pytest.raises(ExecFailed) as ei:
        run(client, ["/no/such/file"])
    assert ei.value.code == 127


def test_bad_cwd_is_126(client: AgentClient) -> None:
    with pytest.raises(ExecFailed) as ei:
        run(client, ["true"], cwd="/no/such/dir")
    assert ei.value.code == 126 and "/no/such/dir" in ei.value.message


def test_not_executable_is_126(client: AgentClient, tmp_path: Path) -> None:
    f = tmp_path / "data"
    f.write_text("x")
    f.chmod(0o644)
    with pytest.raises(ExecFailed) as ei:
        run(client, [str(f)])
    assert ei.value.code == 126


def test_the_connection_survives_failed_execs(client: AgentClient) -> None:
    for _ in range(3):
        with pytest.raises(ExecFailed):
            run(client, ["no-such-program-xyz"])
    assert sh(client, "echo ok")[1] == b"ok\n"


# ----------------------------------------------------------------- users


@needs_root
def test_numeric_user(client: AgentClient) -> None:
    _, out, _ = run(client, ["id", "-u"], user="65534")
    assert out == b"65534\n"
    _, out, _ = run(client, ["id"], user="12345:54321")
    assert out.startswith(b"uid=12345 gid=54321 groups=54321")


@needs_root
def test_named_user_gets_its_home_and_groups(client: AgentClient) -> None:
    import grp
    import pwd

    nobody = pwd.getpwnam("nobody")
    _, out, _ = run(client, ["/bin/sh", "-c", 'id -un; id -g; echo "$HOME"'], user="nobody")
    assert out.decode().split() == ["nobody", str(nobody.pw_gid), nobody.pw_dir]
    group = grp.getgrgid(0).gr_name
    _, out, _ = run(client, ["id", "-g"], user=f"nobody:{group}")
    assert out == b"0\n"


@needs_root
def test_unknown_user_or_group_is_126(client: AgentClient) -> None:
    for user in ("no-such-user-xyz", "nobody:no-such-group-xyz", ":"):
        with pytest.raises(ExecFailed) as ei:
            run(client, ["true"], user=user)
        assert ei.value.code == 126


# ----------------------------------------------------------------- tty


def test_tty_process(client: AgentClient) -> None:
    status, out, err = run(client, ["tty"], tty=True)
    assert status.code == 0 and err == b""
    assert re.fullmatch(rb"/dev/pts/\d+\r\n", out), out
    _, out, _ = run(client, ["stty", "size"], tty=True, rows=33, cols=111)
    assert out == b"33 111\r\n"


def test_tty_resize_and_stdin(client: AgentClient) -> None:
    p = client.exec(ExecRequest(["/bin/sh", "-c", "read x; stty size; echo got $x"],
                                tty=True, rows=10, cols=20))
    p.wait_started(T)
    p.resize(50, 132)
    p.write_stdin(b"abc\n")
    assert p.wait(T).code == 0
    assert b"50 132\r\n" in p.stdout and b"got abc" in p.stdout


def test_tty_eof_is_ctrl_d(client: AgentClient) -> None:
    p = client.exec(ExecRequest(["cat"], tty=True))
    p.write_stdin(b"line\n")
    p.close_stdin()
    assert p.wait(T).code == 0


# ----------------------------------------------------------------- signals, reaping


def test_signal_a_sleeping_process(client: AgentClient) -> None:
    p = client.exec(ExecRequest(["sleep", "100"]))
    p.wait_started(T)
    with pytest.raises(ProcessTimeout):
        p.wait(0.2)
    p.signal(signal.SIGTERM)
    assert p.wait(T) == ExitStatus(signal=15)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has been killed: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + T
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.02)


def test_signal_goes_to_the_process_group(client: AgentClient) -> None:
    p = client.exec(ExecRequest(["/bin/sh", "-c", "sleep 100; echo not reached"]))
    pid = p.wait_started(T)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + T
    while not (kids := children.read_text().split()):  # until the shell has forked sleep
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (sleeper,) = map(int, kids)
    p.signal(signal.SIGKILL)
    assert p.wait(T).signal == 9
    assert p.stdout == b""
    # The shell's child died with it: signalling the shell alone would have
    # left `sleep 100` running as an orphan of the agent.
    wait_gone(sleeper)


def test_exit_does_not_wait_for_descendants_holding_the_pipes(client: AgentClient) -> None:
    p = client.exec(ExecRequest(["/bin/sh", "-c", "sleep 1000 & echo $!"]))
    assert p.wait(T).code == 0
    descendant = int(p.stdout)
    try:
        assert alive(descendant)  # EXIT came while it still held the output pipes
    finally:
        os.kill(descendant, signal.SIGKILL)


def test_orphans_are_reaped(client: AgentClient, running: Running) -> None:
    sh(client, "(sleep 0.2 &) ; exit 0")
    children = Path(f"/proc/{running.proc.pid}/task/{running.proc.pid}/children")
    deadline = time.monotonic() + T
    while children.read_text().split() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children.read_text().split() == []


def test_shutdown_ends_the_agent_with_0(running: Running) -> None:
    c = AgentClient(running.sock)
    c.hello(T)
    p = c.exec(ExecRequest(["sleep", "100"]))
    pid = p.wait_started(T)
    c.shutdown()
    assert running.proc.wait(T) == 0
    # The agent reported what SHUTDOWN killed before it hung up (the stream is
    # ordered: its EXIT precedes the end of the connection).
    assert p.wait(T).signal == 15
    assert not alive(pid)
    c.close()


def test_agent_exits_when_the_host_hangs_up(running: Running) -> None:
    c = AgentClient(running.sock)
    c.hello(T)
    p = c.exec(ExecRequest(["sleep", "100"]))
    pid = p.wait_started(T)
    c.close()
    with pytest.raises(AgentDisconnected):
        p.wait(T)
    assert running.proc.wait(T) == 0
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_agent_death_releases_waiters_with_agent_disconnected(running: Running) -> None:
    lost: list[Exception] = []
    c = AgentClient(running.sock, on_disconnect=lost.append)
    c.hello(T)
    p = c.exec(ExecRequest(["sleep", "100"]))
    p.wait_started(T)
    running.proc.kill()
    with pytest.raises(AgentDisconnected):
        p.wait(T)
    assert len(lost) == 1 and isinstance(lost[0], AgentDisconnected)
    with pytest.raises(AgentDisconnected):
        c.exec(ExecRequest(["true"]))
    c.close()


# ----------------------------------------------------------------- a hostile host


_decoders: weakref.WeakKeyDictionary[socket.socket, tuple[FrameDecoder, list[Frame]]] = (
    weakref.WeakKeyDictionary())


def raw_exchange(sock: socket.socket, frames: list[Frame] | bytes, want: int) -> list[Frame]:
    """Send raw frames (or bytes) and collect ``want`` frames back."""
    sock.sendall(frames if isinstance(frames, bytes) else
                 b"".join(encode_frame(f) for f in frames))
    sock.settimeout(T)
    dec, pending = _decoders.setdefault(sock, (FrameDecoder(), []))
    while len(pending) < want:
        data = sock.recv(65536)
        assert data, f"agent hung up; got {pending}"
        pending += dec.feed(data)
    got = pending[:want]
    del pending[:want]
    return got


def hello(sock: socket.socket) -> None:
    (ready,) = raw_exchange(sock, [json_frame(FrameType.HELLO, 0, {"version": 1})], 1)
    assert ready.type is FrameType.READY


def test_bad_requests_get_error_frames(running: Running) -> None:
    s = running.sock
    cases: list[tuple[Frame, int]] = [
        (Frame(FrameType.EXEC, 5, b"not json"), 5),
        (Frame(FrameType.EXEC, 6, b'{"argv": []}'), 6),
        (Frame(FrameType.EXEC, 7, b'{"argv": "ls"}'), 7),
        (Frame(FrameType.EXEC, 8, b'{"argv": ["a\\u0000b"]}'), 8),
        (Frame(FrameType.EXEC, 9, b'{"argv": ["true"], "tty": 1}'), 9),
        (Frame(FrameType.EXEC, 10, b'{"argv": ["\\ud800"]}'), 10),
        (Frame(FrameType.EXEC, 0, b'{"argv": ["true"]}'), 0),
        (Frame(FrameType.SIGNAL, 3, b'{"signal": 1000}'), 0),
        (Frame(FrameType.SIGNAL, 3, b'{"signal": 1.5}'), 0),
        (Frame(FrameType.RESIZE, 3, b"[]"), 0),
        (Frame(FrameType.STDIN, 0, b"x"), 0),
        (Frame(FrameType.HELLO, 0, b"\xff"), 0),
        (Frame(FrameType.READY, 0, b"{}"), 0),   # a guest-to-host type sent to the guest
        (Frame(FrameType.READY, 11, b"{}"), 11),
    ]
    for frame, channel in cases:
        (err,) = raw_exchange(s, [frame], 1)
        assert (err.type, err.channel) == (FrameType.ERROR, channel), (frame, err)
        assert json_payload(err)["code"] == 1
    # unknown keys, nested values, and nulls are skipped
    req = (b'{"x": {"y": [1, 2.5e3, {"z": null}], "w": "\\u00e9"}, "argv": ["echo", "ok"],'
           b' "cwd": null, "rows": -1, "future": true}')
    got = raw_exchange(s, [Frame(FrameType.EXEC, 12, req)], 3)
    assert [f.type for f in got] == [FrameType.STARTED, FrameType.STDOUT, FrameType.EXIT]
    assert got[1].payload == b"ok\n"
    # STDIN / SIGNAL / RESIZE to a channel that is not live are dropped quietly
    raw_exchange(s, [Frame(FrameType.STDIN, 99, b"x"),
                     json_frame(FrameType.SIGNAL, 99, {"signal": 9}),
                     json_frame(FrameType.RESIZE, 99, {"rows": 1, "cols": 1})], 0)
    hello(s)
    assert running.proc.poll() is None


def test_exec_on_a_live_channel_is_refused(running: Running) -> None:
    s = running.sock
    exec_sleep = Frame(FrameType.EXEC, 4, ExecRequest(["sleep", "100"]).to_payload())
    (started,) = raw_exchange(s, [exec_sleep], 1)
    assert started.type is FrameType.STARTED
    (err,) = raw_exchange(s, [exec_sleep], 1)
    assert (err.type, err.channel) == (FrameType.ERROR, 0)
    (exit_,) = raw_exchange(s, [json_frame(FrameType.SIGNAL, 4, {"signal": 9})], 1)
    assert (exit_.type, json_payload(exit_)) == (FrameType.EXIT, {"signal": 9})


@pytest.mark.parametrize("header", [
    struct.pack(">IBI", 0xFFFFFFFF, FrameType.EXEC, 1),
    struct.pack(">IBI", 5 + MAX_PAYLOAD + 1, FrameType.STDIN, 1),
    struct.pack(">IBI", 2, FrameType.HELLO, 0),
])
def test_a_bad_frame_length_does_not_crash_the_agent(running: Running, header: bytes,
                                                     tmp_path: Path) -> None:
    s = running.sock
    hello(s)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (started,) = raw_exchange(s, [Frame(FrameType.EXEC, 1,
                                        ExecRequest(["cat", str(fifo)]).to_payload())], 1)
    assert started.type is FrameType.STARTED
    (err,) = raw_exchange(s, header + os.urandom(1000), 1)
    assert (err.type, err.channel) == (FrameType.ERROR, 0)
    assert json_payload(err)["code"] == 2
    # It ignores the rest of this session's input: ten HELLOs get no READY...
    s.sendall(encode_frame(json_frame(FrameType.HELLO, 0, {"version": 1})) * 10)
    # ...and stays alive: a process started before still has its output forwarded.
    fd = os.open(fifo, os.O_WRONLY)
    os.write(fd, b"late\n")
    os.close(fd)
    got = raw_exchange(s, b"", 2)
    assert [(f.type, f.channel, f.payload) for f in got[:1]] == [(FrameType.STDOUT, 1, b"late\n")]
    assert (got[1].type, got[1].channel) == (FrameType.EXIT, 1)
    # Everything it sends until it ends (when the host hangs up, in test mode)
    # is read here: no READY among it, and an orderly exit, not a crash.
    s.shutdown(socket.SHUT_WR)
    rest = b""
    while data := s.recv(65536):
        rest += data
    dec, pending = _decoders[s]
    assert pending + dec.feed(rest) == []
    assert running.proc.wait(T) == 0


def test_an_unknown_frame_type_gets_an_error(running: Running) -> None:
    s = running.sock
    (err,) = raw_exchange(s, struct.pack(">IBI", 7, 0x7E, 3) + b"{}", 1)
    assert (err.type, err.channel) == (FrameType.ERROR, 3)
    (err,) = raw_exchange(s, struct.pack(">IBI", 5, 0x7E, 0), 1)
    assert (err.type, err.channel) == (FrameType.ERROR, 0)
    hello(s)


def test_a_maximal_frame_is_accepted(running: Running) -> None:
    s = running.sock
    big = json.dumps({"argv": ["true"], "pad": "x" * (MAX_PAYLOAD - 40)}).encode()
    assert len(big) <= MAX_PAYLOAD
    got = raw_exchange(s, [Frame(FrameType.EXEC, 1, big)], 2)
    assert [f.type for f in got] == [FrameType.STARTED, FrameType.EXIT]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["signal", "rows", "cols", "argv", "version", "tty"]),
                    json_values, max_size=4).map(lambda v: json.dumps(v).encode()),
), st.sampled_from([FrameType.HELLO, FrameType.SIGNAL, FrameType.RESIZE]))
def test_fuzzed_payloads_never_break_the_agent(fuzz_agent: Running, payload: bytes,
                                               ftype: FrameType) -> None:
    s = fuzz_agent.sock
    got = raw_exchange(s, [Frame(ftype, 0, payload),
                           json_frame(FrameType.HELLO, 0, {"version": 1})], 1)
    if got[0].type is FrameType.ERROR:
        got += raw_exchange(s, b"", 1)
    assert got[-1].type is FrameType.READY
    assert fuzz_agent.proc.poll() is None


@pytest.fixture(scope="module")
def fuzz_agent(agent_bin: Path) -> Iterator[Running]:
    with start_agent(agent_bin) as r:
        yield r


# ----------------------------------------------------------------- a hostile guest


@contextlib.contextmanager
def fake_guest() -> Iterator[tuple[AgentClient, socket.socket]]:
    host, guest = socket.socketpair()
    c = AgentClient(host)
    try:
        yield c, guest
    finally:
        c.close()
        guest.close()


def test_garbage_from_the_guest_is_a_protocol_error() -> None:
    with fake_guest() as (c, guest):
        guest.sendall(b"\xff" * 64)
        with pytest.raises(ProtocolError):
            c.hello(T)
        with pytest.raises(ProtocolError):
            c.exec(ExecRequest(["true"]))


def test_an_oversized_frame_from_the_guest_fails_waiters() -> None:
    with fake_guest() as (c, guest):
        p = c.exec(ExecRequest(["true"]))
        guest.sendall(struct.pack(">IBI", 5 + MAX_PAYLOAD + 1, FrameType.STDOUT, p.channel))
        with pytest.raises(ProtocolError):
            p.wait(T)


@pytest.mark.parametrize("frame", [
    Frame(FrameType.READY, 0, b"[]"),
    Frame(FrameType.EXEC, 0, b"{}"),
    Frame(FrameType.STDOUT, 0, b"x"),
    json_frame(FrameType.ERROR, 0, {"message": "lost framing", "code": 2}),
])
def test_bad_frames_from_the_guest(frame: Frame) -> None:
    with fake_guest() as (c, guest):
        p = c.exec(ExecRequest(["true"]))
        guest.sendall(encode_frame(frame))
        with pytest.raises(ProtocolError):
            p.wait(T)


def test_a_bad_exit_payload_is_a_protocol_error() -> None:
    with fake_guest() as (c, guest):
        p = c.exec(ExecRequest(["true"]))
        guest.sendall(encode_frame(json_frame(FrameType.EXIT, p.channel, {"code": "zero"})))
        with pytest.raises(ProtocolError):
            p.wait(T)


def test_a_truncated_frame_then_hangup_is_a_disconnect() -> None:
    with fake_guest() as (c, guest):
        p = c.exec(ExecRequest(["true"]))
        guest.sendall(encode_frame(Frame(FrameType.STDOUT, p.channel, b"abc"))[:-1])
        guest.shutdown(socket.SHUT_RDWR)
        with pytest.raises(AgentDisconnected):
            p.wait(T)
        assert p.stdout == b""


def test_output_limit_and_callbacks_stop_at_close() -> None:
    host, guest = socket.socketpair()
    c = AgentClient(host, output_limit=10)
    p = c.exec(ExecRequest(["x"]))
    seen: list[bytes] = []
    q = c.exec(ExecRequest(["y"]), on_stdout=seen.append)
    guest.sendall(encode_frame(Frame(FrameType.STDOUT, p.channel, b"0123456789abc"))
                  + encode_frame(Frame(FrameType.STDOUT, q.channel, b"first")))
    deadline = time.monotonic() + T
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.stdout == b"0123456789" and p.truncated
    c.close()
    with contextlib.suppress(OSError):
        guest.sendall(encode_frame(Frame(FrameType.STDOUT, q.channel, b"late")))
    time.sleep(0.1)
    assert seen == [b"first"]
    with pytest.raises(AgentDisconnected):
        q.wait(T)
    guest.close()


def test_connect_retries_until_the_socket_exists(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def listen_later() -> None:
        time.sleep(0.3)
        server.bind(str(path))
        server.listen(1)

    t = threading.Thread(target=listen_later)
    t.start()
    c = AgentClient.connect(path, timeout=T)
    t.join()
    conn, _ = server.accept()
    conn.close()
    with pytest.raises(AgentDisconnected):
        c.hello(T)
    c.close()
    server.close()
    with pytest.raises(Exception, match="did not accept"):
        AgentClient.connect(tmp_path / "never.sock", timeout=0.2)


# ----------------------------------------------------------------- the builder


def test_builder_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = agent_builder.build_agent(tmp_path)
    assert first.parent.parent == tmp_path / "agent" and first.name == "ember-agent"
    assert os.access(first, os.X_OK)
    mtime = first.stat().st_mtime_ns

    calls: list[list[str]] = []
    real_run = ember.util.run

    def spy(cmd: list[str], **kw: object) -> str:
        calls.append([str(c) for c in cmd])
        return real_run(cmd, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr("ember.guest.agent.run", spy)
    assert agent_builder.build_agent(tmp_path) == first
    assert first.stat().st_mtime_ns == mtime
    assert not any("-o" in c for c in calls)
    assert list(first.parent.iterdir()) == [first]  # no temp files left behind


def test_builder_key_covers_every_agent_source_and_header(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src" / agent_builder.AGENT_SOURCES
    shutil.copytree(agent_builder._SOURCE_DIR / agent_builder.AGENT_SOURCES, src)
    monkeypatch.setattr(agent_builder, "_SOURCE_DIR", src.parent)
    cache = tmp_path / "cache"
    first = agent_builder.agent_path(cache)
    files = sorted(src.iterdir())
    assert {"agent.h", "main.c"} <= {f.name for f in files}
    seen = {first}
    for f in files:  # a change to any of them is a new key
        original = f.read_bytes()
        f.write_bytes(original + b"\n")
        key = agent_builder.agent_path(cache)
        assert key not in seen, f.name
        seen.add(key)
        f.write_bytes(original)
    assert agent_builder.agent_path(cache) == first
    (src / "later.c").write_bytes(b"")  # and so is a file added
    assert agent_builder.agent_path(cache) not in seen


def test_builder_poweroff(tmp_path: Path) -> None:
    binary = agent_builder.build_poweroff(tmp_path)
    assert binary.name == "ember-poweroff"
    # not PID 1: it refuses (and never reboots the host)
    proc = subprocess.run([str(binary)], capture_output=True, timeout=T)
    assert proc.returncode == 2 and b"PID 1" in proc.stderr


def test_builder_without_gcc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(HostError, match="gcc"):
        agent_builder.build_agent(tmp_path)


def test_agent_refuses_to_run_without_serve_fd(agent_bin: Path) -> None:
    proc = subprocess.run([str(agent_bin)], capture_output=True, timeout=T,
                          env={"PATH": "/bin"})
    assert proc.returncode == 2 and b"usage" in proc.stderr
