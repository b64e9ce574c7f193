"""The daemon end to end: a real ``ember serve``, real microVMs, driven over its REST API.

The API is used here the way any client would, with raw HTTP over the Unix
socket (the SDK has its own tests), so these tests pin the contract itself.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from daemon_api import Events, create, delay_of, delete, last_seq, run, stamp, start, wait_for

if TYPE_CHECKING:
    from conftest import Daemon


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.http() as c:
        yield c


def wait_state(api: httpx.Client, name: str, *states: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        m = api.get(f"/v1/machines/{name}").json()
        if m["state"] in states:
            return dict(m)
        assert time.monotonic() < deadline, f"{name} stayed {m['state']}: {m}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def service(api: httpx.Client) -> Iterator[str]:
    """A running machine with a long-lived main process, shared by the module."""
    create(api, name="svc", cmd=["sleep", "3600"], cpus=2, env={"GREETING": "hello"})
    start(api, "svc")
    yield "svc"
    delete(api, "svc")


def test_exec_returns_output_exit_code_and_takes_stdin(api: httpx.Client, service: str) -> None:
    res = run(api, service, "sh", "-c", "echo out; echo err >&2; cat; exit 3", stdin="fed in")
    assert res == {"exit_code": 3, "signal": None, "stdout": "out\nfed in", "stderr": "err\n",
                   "timed_out": False, "truncated": False}
    # the machine's env, user and workdir are the defaults of an exec
    res = run(api, service, "sh", "-c", 'echo "$GREETING $(id -un) $PWD"')
    assert res["stdout"] == "hello app /app\n"
    res = run(api, service, "id", "-u", user="root", env={"X": "1"})
    assert res["stdout"] == "0\n"


def test_exec_errors_and_timeout(api: httpx.Client, service: str) -> None:
    res = run(api, service, "no-such-program")
    assert res["exit_code"] == 127 and "not found" in res["stderr"]
    res = run(api, service, "sleep", "30", timeout=0.5)
    assert res["timed_out"] is True and res["exit_code"] == 137


def test_exec_stream_is_ndjson_with_base64_chunks(api: httpx.Client, service: str) -> None:
    body = {"cmd": ["sh", "-c", "echo one; echo two >&2; head -c 300000 /dev/zero; exit 5"]}
    events = []
    with api.stream("POST", f"/v1/machines/{service}/exec/stream", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        for line in r.iter_lines():
            events.append(json.loads(line))
    assert events[0]["type"] == "started" and events[0]["pid"] > 1
    assert events[-1] == {"type": "exit", "exit_code": 5, "timed_out": False}
    out = b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "stdout")
    err = b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == "stderr")
    assert out == b"one\n" + b"\0" * 300000
    assert err == b"two\n"


def test_several_execs_at_once_in_one_machine(api: httpx.Client, service: str) -> None:
    # A barrier in the guest: each exec waits until all six have arrived, which
    # only happens if they run at the same time (one at a time, each gives up).
    barrier = f"/tmp/barrier.{os.getpid()}"
    wait_all = (f"mkdir -p {barrier}; touch {barrier}/$0; n=0; "
                f"until [ $(ls {barrier} | wc -l) -eq 6 ]; do "
                f"n=$((n+1)); [ $n -lt 600 ] || exit 99; sleep 0.1; done")

    def job(i: int) -> dict[str, Any]:
        return run(api, service, "sh", "-c", f"{wait_all}; echo job$0; exit {i}", str(i))

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(job, range(6)))
    assert [(r["stdout"], r["exit_code"]) for r in results] == \
        [(f"job{i}\n", i) for i in range(6)]


def test_pause_resume_and_wrong_state_is_409(api: httpx.Client, service: str) -> None:
    assert api.post(f"/v1/machines/{service}/pause").json()["state"] == "paused"
    r = api.post(f"/v1/machines/{service}/exec", json={"cmd": ["true"]})
    assert r.status_code == 409
    assert r.json()["error"]["message"] == "machine svc is paused: exec needs it running"
    assert api.post(f"/v1/machines/{service}/pause").status_code == 409
    assert api.post(f"/v1/machines/{service}/resume").json()["state"] == "running"
    assert run(api, service, "echo", "back")["stdout"] == "back\n"
    r = api.delete(f"/v1/machines/{service}")
    assert r.status_code == 409 and "stop it first" in r.json()["error"]["message"]


def test_main_process_output_is_logged_and_its_exit_stops_the_machine(
        api: httpx.Client) -> None:
    create(api, name="oneshot")  # the image's own Cmd: /app/hello.sh
    start(api, "oneshot")
    m = wait_state(api, "oneshot", "stopped")
    assert m["exit_code"] == 0 and m["reason"] == "main process exited with code 0"
    out = api.get("/v1/machines/oneshot/logs").text
    assert "Hello, world! This is oneshot" in out
    console = api.get("/v1/machines/oneshot/logs", params={"source": "console"}).text
    assert "reboot" in console
    assert api.get("/v1/machines/oneshot/logs", params={"tail": 1}).text.count("\n") == 1
    r = api.post("/v1/machines/oneshot/exec", json={"cmd": ["true"]})
    assert r.status_code == 409
    # a stopped machine starts again
    start(api, "oneshot")
    wait_state(api, "oneshot", "stopped")
    assert api.get("/v1/machines/oneshot/logs").text.count("Hello, world!") == 2
    delete(api, "oneshot")
    assert api.get("/v1/machines/oneshot").status_code == 404


def test_logs_follow_streams_until_the_machine_stops(api: httpx.Client) -> None:
    create(api, name="ticker", cmd=["sh", "-c", "for i in 1 2 3; do echo tick$i; sleep 0.3; done"])
    start(api, "ticker")
    with api.stream("GET", "/v1/machines/ticker/logs", params={"follow": "true"}) as r:
        text = b"".join(r.iter_bytes()).decode()
    assert text == "tick1\ntick2\ntick3\n"
    delete(api, "ticker")


def test_stop_is_graceful_then_forced(api: httpx.Client) -> None:
    # a main process that ignores SIGTERM: stop waits `timeout`, then powers off
    create(api, name="stubborn",
           cmd=["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"])
    start(api, "stubborn")
    deadline = time.monotonic() + 20
    while "ready" not in api.get("/v1/machines/stubborn/logs").text:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t = time.monotonic()
    m = api.post("/v1/machines/stubborn/stop", params={"timeout": 1}).json()
    assert m["state"] == "stopped" and m["reason"] == "stopped by request"
    assert time.monotonic() - t >= 1.0  # the grace period was honoured before the power-off
    assert m["pid"] is None
    delete(api, "stubborn")


def test_restart_policy_on_failure_backs_off_and_stop_cancels_a_pending_restart(
        api: httpx.Client, daemon: Daemon) -> None:
    with Events(daemon, "flaky") as ev:
        create(api, name="flaky", cmd=["sh", "-c", "echo try; exit 3"], restart="on-failure")
        start(api, "flaky")
        # Quick failures back off from 0.1 s, doubling; each boot waits out its delay.
        ev.wait_count("restarting", 5)
        m = api.post("/v1/machines/flaky/stop").json()  # during the 1.6 s wait
        assert m["state"] == "stopped" and m["restart_count"] >= 5
        events = ev.wait(lambda evs: True, "events")
        restarting = [e for e in events if e["type"] == "restarting"]
        assert [delay_of(e) for e in restarting] == [0.1, 0.2, 0.4, 0.8, 1.6]
        for r in restarting[:-1]:
            boot = next(e for e in events if e["seq"] > r["seq"] and e["type"] == "starting")
            assert stamp(boot) - stamp(r) >= delay_of(r) - 0.002, (r, boot)
        # The stop came while the last restart was pending: no boot since it ...
        assert [e["type"] for e in events if e["seq"] > restarting[-1]["seq"]] \
            in ([], ["stopped"]), events
        # ... and none comes when it was due.
        ev.none_within("starting", delay_of(restarting[-1]) + 2.0)
    m = api.get("/v1/machines/flaky").json()
    assert m["state"] == "stopped" and m["restart_count"] == 5
    assert api.get("/v1/machines/flaky/logs").text.count("try\n") == 5
    delete(api, "flaky")


def test_vmm_killed_marks_crashed_frees_resources_spares_others(
        api: httpx.Client, service: str, daemon: Daemon) -> None:
    from ember.vmm.spec import MachineSpec

    created = create(api, name="victim", cmd=["sleep", "3600"])
    state = daemon.home / "machines" / "daemon" / created["id"] / "victim"
    pid = start(api, "victim")["pid"]
    # the guest's RAM: a memfd QEMU holds, on no filesystem
    fd = int((state / MachineSpec.MEMORY_FD_FILE).read_text())
    memory = Path(f"/proc/{pid}/fd/{fd}")
    assert os.readlink(memory).startswith("/memfd:ember-victim")
    assert memory.stat().st_size == 256 << 20
    assert not (state / MachineSpec.MEMORY_FILE).exists()
    os.kill(pid, signal.SIGKILL)
    m = wait_state(api, "victim", "crashed")
    assert "QEMU exited unexpectedly (signal 9)" in m["reason"]
    assert m["pid"] is None
    assert not memory.exists()
    assert run(api, service, "echo", "fine")["stdout"] == "fine\n"
    # a crashed machine can be started again
    start(api, "victim")
    delete(api, "victim")


def test_events_stream_lifecycle(api: httpx.Client, daemon: Daemon) -> None:
    with Events(daemon, "evt") as ev:  # follows from the daemon's last event on: no gap
        create(api, name="evt", cmd=["sleep", "60"])
        start(api, "evt")
        api.post("/v1/machines/evt/stop", params={"timeout": 0})
        delete(api, "evt")
        seen = ev.wait(lambda evs: any(e["type"] == "deleted" for e in evs), "deleted")
    types = [e["type"] for e in seen]
    assert types[:3] == ["created", "starting", "started"]
    assert types[-2:] == ["stopped", "deleted"]
    assert [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)
    # the log replays from a sequence number
    first = seen[0]["seq"]
    replay = api.get("/v1/events", params={"since": first - 1, "follow": "false"}).text
    assert [json.loads(x)["type"] for x in replay.splitlines()
            if json.loads(x)["machine"] == "evt"] == types


def test_published_port_reaches_the_guest(api: httpx.Client) -> None:
    m = create(api, name="web", ports=[{"guest_port": 8080}],
               cmd=["sh", "-c", "while :; do echo pong | nc -l -p 8080; done"])
    m = start(api, "web")
    (port,) = m["ports"]
    assert port["guest_port"] == 8080 and port["host_ip"] == "127.0.0.1" and port["host_port"] > 0
    deadline = time.monotonic() + 20
    got = b""
    while b"pong" not in got and time.monotonic() < deadline:
        # refused (a tap network) or reset (slirp) until nc listens in the guest
        try:
            with socket.create_connection(("127.0.0.1", port["host_port"]), timeout=5) as s:
                s.sendall(b"ping\n")
                got = s.recv(100)
        except (TimeoutError, ConnectionResetError, ConnectionRefusedError):
            got = b""
        time.sleep(0.2)
    assert got == b"pong\n"
    delete(api, "web")
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port["host_port"]),
                                                         timeout=2):
        pass


def test_daemon_restart_readopts_running_machines(api: httpx.Client, daemon: Daemon) -> None:
    create(api, name="keeper", cmd=["sh", "-c", "while :; do date +%s; sleep 0.5; done"])
    create(api, name="doomed", cmd=["sleep", "3600"])
    # brief's main process is nc, listening on a published port: it ends when the test
    # connects and closes, and its socket closing is how the test sees that it ended.
    create(api, name="brief", cmd=["nc", "-l", "-p", "8080"], ports=[{"guest_port": 8080}])
    keeper = start(api, "keeper")
    doomed = start(api, "doomed")
    brief = start(api, "brief")
    # a socket in state LISTEN (0A) on local port 8080 (1F90), IPv4 or IPv6
    listening = "cat /proc/net/tcp* | grep -q ':1F90 [0-9A-F]*:0000 0A'"
    assert run(api, "brief", "sh", "-c", f"until {listening}; do sleep 0.05; done",
               timeout=60)["exit_code"] == 0
    daemon.stop(signal.SIGKILL)  # killed, not asked: nothing may depend on a clean exit
    os.kill(doomed["pid"], signal.SIGKILL)  # and one VMM dies while no daemon watches
    os.kill(keeper["pid"], 0)  # the other lives on
    # brief's main process ends meanwhile
    with socket.create_connection(("127.0.0.1", brief["ports"][0]["host_port"]),
                                  timeout=60) as s:
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b""  # nc exited: the guest closed the connection
    daemon.start()
    with daemon.http() as c:
        m = c.get("/v1/machines/keeper").json()
        assert m["state"] == "running" and m["pid"] == keeper["pid"]
        assert run(c, "keeper", "echo", "still here")["stdout"] == "still here\n"
        d = c.get("/v1/machines/doomed").json()
        assert d["state"] == "crashed" and "while the daemon was down" in d["reason"]
        b = c.get("/v1/machines/brief").json()
        assert b["state"] == "stopped"
        assert b["reason"] == "main process exited while the daemon was down"
        delete(c, "brief")
        # the main process is still followed: stop gets its exit, logs keep growing
        before = c.get("/v1/machines/keeper/logs").text.count("\n")
        wait_for("keeper's log to grow",
                 lambda: c.get("/v1/machines/keeper/logs").text.count("\n") > before + 2)
        m = c.post("/v1/machines/keeper/stop", params={"timeout": 5}).json()
        assert m["state"] == "stopped" and m["exit_code"] == 143
        delete(c, "keeper")
        delete(c, "doomed")


def _count_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _qemus(root: Path) -> set[int]:
    """QEMU processes of machines under ``root``."""
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.readlink(p / "cwd").startswith(str(root)) and \
                        (p / "exe").resolve().name.startswith("qemu-system"):
                    out.add(int(p.name))
            except OSError:
                pass
    return out


@pytest.mark.timeout(900)  # 51 boots: about 100 s on 2 idle cores
def test_fifty_cycles_leak_nothing(api: httpx.Client, daemon: Daemon) -> None:
    assert daemon.proc is not None
    root = daemon.home / "machines" / "daemon"

    def cycle(i: int) -> None:
        create(api, name=f"cycle{i}", cmd=["sleep", "600"], ports=[{"guest_port": 80}])
        m = start(api, f"cycle{i}")
        assert run(api, f"cycle{i}", "echo", str(i))["stdout"] == f"{i}\n"
        r = api.delete(f"/v1/machines/cycle{i}", params={"force": "true"})
        assert r.status_code == 204
        with pytest.raises(OSError), socket.create_connection(
                ("127.0.0.1", m["ports"][0]["host_port"]), timeout=2):
            pass

    cycle(-1)  # warm up: threads, pools, caches
    fds = _count_fds(daemon.proc.pid)
    qemus = _qemus(root)
    dirs = set(os.listdir(root))
    threads = len(os.listdir(f"/proc/{daemon.proc.pid}/task"))
    for i in range(50):
        cycle(i)
    assert _qemus(root) == qemus
    assert set(os.listdir(root)) == dirs
    assert _count_fds(daemon.proc.pid) <= fds + 2
    assert len(os.listdir(f"/proc/{daemon.proc.pid}/task")) <= threads + 4


def test_files_put_and_get_through_the_api(api: httpx.Client, service: str) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("conf/app.ini", b"[app]\nx=1\n"), ("conf/bin.dat", bytes(range(256)))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    r = api.put(f"/v1/machines/{service}/files", params={"path": "/srv"}, content=buf.getvalue(),
                headers={"content-type": "application/x-tar"})
    assert r.status_code == 204, r.text
    assert run(api, service, "cat", "/srv/conf/app.ini")["stdout"] == "[app]\nx=1\n"
    r = api.get(f"/v1/machines/{service}/files", params={"path": "/srv/conf"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = sorted(tar.getnames())
        assert names == ["conf", "conf/app.ini", "conf/bin.dat"]
        f = tar.extractfile("conf/bin.dat")
        assert f is not None and f.read() == bytes(range(256))
    r = api.get(f"/v1/machines/{service}/files", params={"path": "/no/such/file"})
    assert r.status_code == 404, r.text
    r = api.put(f"/v1/machines/{service}/files", params={"path": "/srv"}, content=b"not a tar")
    assert r.status_code in (400, 422), r.text


def test_concurrent_actions_on_one_machine_are_serialised(api: httpx.Client,
                                                          daemon: Daemon) -> None:
    actions = [("POST", "start"), ("POST", "stop?timeout=0"), ("POST", "pause"),
               ("POST", "resume"), ("POST", "kill"), ("EXEC", ""), ("GET", "")] * 4

    def act(i: int) -> tuple[str, int, str | None]:
        method, what = actions[(i * 5) % len(actions)]  # every action, interleaved
        with daemon.http() as c:
            if method == "EXEC":
                r = c.post("/v1/machines/contended/exec", json={"cmd": ["true"]})
            elif method == "GET":
                r = c.get("/v1/machines/contended")
            else:
                r = c.post(f"/v1/machines/contended/{what}")
        assert r.status_code in (200, 409), r.text
        # a start on a running machine answers 200 and leaves it as it is
        # (as ``docker start``): the boot it reports tells the two apart
        boot = r.json().get("started_at") if what == "start" and r.status_code == 200 else None
        return what.partition("?")[0] or method, r.status_code, boot

    since = last_seq(api)
    create(api, name="contended", cmd=["sleep", "3600"])
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(act, range(len(actions))))
    # every action published its events before it answered
    replay = api.get("/v1/events", params={"since": since, "follow": "false"}).text
    events = [e for e in map(json.loads, replay.splitlines()) if e["machine"] == "contended"]
    m = api.get("/v1/machines/contended").json()
    ok = {what: sum(1 for w, code, _ in results if w == what and code == 200)
          for what in ("start", "stop", "pause", "resume", "kill")}
    boots = {boot for w, code, boot in results if boot is not None}
    assert ok["start"] >= 1, results  # the interleaving did something
    # Applied one after the other, the actions leave a history that is a path
    # through the state machine, each success exactly one transition.
    after = {"starting": ({"created", "stopped", "crashed"}, "starting"),
             "started": ({"starting"}, "running"),
             "paused": ({"running"}, "paused"), "resumed": ({"paused"}, "running"),
             "stopping": ({"running", "paused"}, "stopping"),
             "stopped": ({"stopping", "running", "paused"}, "stopped")}
    state = "created"
    history = [e["type"] for e in events if e["type"] != "created"]
    for t in history:
        if t == "exited":
            continue
        assert t in after and state in after[t][0], (state, t, history)
        state = after[t][1]
    counted = {t: history.count(t) for t in after}
    assert counted["started"] == counted["starting"] == len(boots), (history, results)
    assert counted["stopping"] <= ok["stop"], (history, results)
    assert counted["stopped"] == counted["stopping"] + ok["kill"], (history, results)
    assert state == m["state"]
    assert m["state"] in ("running", "paused", "stopped")
    # whatever the interleaving, the record matches reality
    if m["state"] == "stopped":
        assert m["pid"] is None
    else:
        os.kill(m["pid"], 0)
    r = api.delete("/v1/machines/contended", params={"force": "true"})
    assert r.status_code == 204
    root = daemon.home / "machines" / "daemon"
    assert not (root / m["id"]).exists()
    assert not _qemus(root / m["id"])


def test_interactive_exec_over_websocket(daemon: Daemon, service: str) -> None:
    from websockets.sync.client import unix_connect

    url = f"ws://ember/v1/machines/{service}/exec/ws"
    with unix_connect(str(daemon.socket), url) as ws:
        ws.send(json.dumps({"cmd": ["sh", "-c", "stty size; read x; echo got $x; stty size; "
                                    "tty; exit 7"], "tty": True}))
        out = b""
        while b"24 80\r\n" not in out:  # the terminal's size at the start
            msg = ws.recv(timeout=30)
            assert isinstance(msg, bytes) and msg[0] == 1, msg  # a terminal has one stream
            out += msg[1:]
        ws.send(json.dumps({"type": "resize", "rows": 30, "cols": 100}))
        ws.send(b"hello\n")
        while isinstance(msg := ws.recv(timeout=30), bytes):
            assert msg[0] == 1
            out += msg[1:]
    assert json.loads(msg) == {"type": "exit", "exit_code": 7, "signal": None,
                               "timed_out": False}
    assert out == b"24 80\r\nhello\r\ngot hello\r\n30 100\r\n/dev/pts/0\r\n"
    # without a terminal: separate streams, and end-of-file on stdin
    with unix_connect(str(daemon.socket), url) as ws:
        ws.send(json.dumps({"cmd": ["sh", "-c", "cat; echo bye >&2"]}))
        ws.send("not json")  # malformed control messages are ignored
        ws.send(json.dumps({"type": "resize"}))
        ws.send(b"abc")
        ws.send(json.dumps({"type": "eof"}))
        got: dict[int, bytes] = {1: b"", 2: b""}
        while isinstance(msg := ws.recv(timeout=30), bytes):
            got[msg[0]] += msg[1:]
    assert got == {1: b"abc", 2: b"bye\n"} and json.loads(msg)["exit_code"] == 0


def test_vmm_is_confined_where_cgroups_allow(api: httpx.Client, service: str) -> None:
    from ember.host.cgroup import probe

    m = api.get(f"/v1/machines/{service}").json()
    if not probe().ok:
        assert m["limits"] == {}
        pytest.skip(f"no usable cgroups here: {probe().reason}")
    limits = m["limits"]
    assert limits["cpus"] in ("2", "2.0")
    assert int(limits["memory_max_bytes"]) > 256 << 20
    procs = Path(limits["cgroup"]) / "cgroup.procs"
    assert str(m["pid"]) in procs.read_text().split()


def test_daemon_killed_during_a_start(api: httpx.Client, daemon: Daemon) -> None:
    created = create(api, name="halfway", cmd=["sleep", "3600"])
    root = daemon.home / "machines" / "daemon" / created["id"]

    def start_it() -> None:
        with daemon.http() as c, contextlib.suppress(httpx.TransportError):
            c.post("/v1/machines/halfway/start")

    t = threading.Thread(target=start_it)
    with Events(daemon, "halfway") as ev:
        t.start()
        ev.wait_count("starting", 1)
    # QEMU is up: freeze it so that the guest cannot finish booting, whatever the timing
    (qemu,) = wait_for("QEMU", lambda: _qemus(root), timeout=30)
    os.kill(qemu, signal.SIGSTOP)
    assert api.get("/v1/machines/halfway").json()["state"] == "starting"
    daemon.stop(signal.SIGKILL)
    t.join(30)
    daemon.start()
    with daemon.http() as c:
        m = c.get("/v1/machines/halfway").json()
        assert m["state"] == "crashed"
        assert m["reason"] == "the daemon stopped while the machine was starting"
        assert not _qemus(root)
        start(c, "halfway")  # and it can be started again
        assert run(c, "halfway", "echo", "ok")["stdout"] == "ok\n"
        delete(c, "halfway")
