"""The SDK against a scripted daemon (httpx.MockTransport): requests sent, answers parsed,
errors mapped, machines cleaned up; and the on-demand start of the daemon, with a stub."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import ember
from ember.api import models
from ember.sdk import (
    APIError,
    AsyncClient,
    Client,
    Conflict,
    DaemonUnavailable,
    InvalidRequest,
    MachineHandle,
    NotFound,
    Unauthorized,
    daemon,
)

MACHINE = {
    "id": "abc123def456", "name": "web", "image": "sample:latest", "image_id": "sha256:00",
    "state": "created", "cpus": 1, "memory_mib": 256, "env": {}, "cmd": ["sleep", "600"],
    "entrypoint": None, "workdir": None, "user": None, "hostname": "web", "network": "user",
    "ports": [], "restart": "no", "created_at": "2024-01-01T00:00:00Z",
}

Handler = Callable[[httpx.Request], httpx.Response]


class Daemon:
    """A scripted daemon: routes ``(METHOD, path)`` to answers, records every request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: dict[tuple[str, str], Handler] = {}

    def on(self, method: str, path: str, status: int = 200, body: Any = None, *,
           content: bytes | None = None) -> None:
        def answer(_: httpx.Request) -> httpx.Response:
            if content is not None:
                return httpx.Response(status, content=content)
            return httpx.Response(status, json=body) if body is not None else \
                httpx.Response(status)
        self.routes[(method, path)] = answer

    def handle(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        route = self.routes.get((request.method, request.url.path))
        if route is None:
            return httpx.Response(404, json={"error": {"code": "not_found",
                                                       "message": "no such route"}})
        return route(request)

    def client(self, **kw: Any) -> Client:
        return Client(base_url="http://ember.test", transport=httpx.MockTransport(self.handle),
                      **kw)

    def aclient(self, **kw: Any) -> AsyncClient:
        return AsyncClient(base_url="http://ember.test",
                           transport=httpx.MockTransport(self.handle), **kw)

    def sent(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]


def err(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


@pytest.fixture
def d() -> Daemon:
    return Daemon()


# ------------------------------------------------------------- errors


@pytest.mark.parametrize(("status", "code", "cls"), [
    (404, "not_found", NotFound), (409, "conflict", Conflict), (422, "invalid", InvalidRequest),
    (400, "bad_request", InvalidRequest), (401, "unauthorized", Unauthorized),
    (500, "internal", APIError),
])
def test_api_errors_become_typed_exceptions_with_the_apis_message(
        d: Daemon, status: int, code: str, cls: type[APIError]) -> None:
    d.on("GET", "/v1/machines/web", status, err(code, f"message for {status}"))
    with d.client() as c, pytest.raises(cls) as info:
        c.machines.get("web")
    assert (info.value.status, info.value.code, str(info.value)) == \
        (status, code, f"message for {status}")
    assert isinstance(info.value, ember.errors.EmberError)


def test_an_error_without_the_error_body_still_has_one_line(d: Daemon) -> None:
    d.on("GET", "/v1/version", 502, content=b"Bad gateway\n<html>...</html>")
    with d.client() as c, pytest.raises(APIError) as info:
        c.version()
    assert str(info.value) == "Bad gateway" and info.value.status == 502


def test_no_socket_is_daemon_unavailable_naming_the_socket(tmp_path: Path) -> None:
    sock = tmp_path / "ember.sock"
    with Client(sock) as c, pytest.raises(DaemonUnavailable, match=str(sock)):
        c.machines.list()


def test_tcp_requests_carry_the_token_and_the_socket_none(
        d: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    d.on("GET", "/v1/version", 200, {"version": "0.1.0", "api": "v1", "accel": "tcg",
                                     "accel_reason": "no kvm"})
    monkeypatch.setenv("EMBER_TOKEN", "s3cret")
    with d.client() as c:
        assert c.version().accel == "tcg"
    assert d.requests[-1].headers["authorization"] == "Bearer s3cret"
    with Client("/tmp/x/ember.sock", transport=httpx.MockTransport(d.handle)) as c:
        c.version()
    assert "authorization" not in d.requests[-1].headers


def test_ember_host_chooses_tcp_or_a_socket(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("EMBER_HOST", "127.0.0.1:7777")
    with Client() as c:
        assert c.endpoint.base_url == "http://127.0.0.1:7777" and c.endpoint.socket_path is None
    monkeypatch.setenv("EMBER_HOST", f"unix://{tmp_path}/s.sock")
    with Client() as c:
        assert c.endpoint.socket_path == tmp_path / "s.sock"
    monkeypatch.delenv("EMBER_HOST")
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    with Client() as c:
        assert c.endpoint.socket_path == tmp_path / "ember.sock"


# ------------------------------------------------------------- request bodies


def test_create_sends_the_contracts_body_then_starts(d: Daemon) -> None:
    d.on("POST", "/v1/machines", 201, MACHINE)
    d.on("POST", "/v1/machines/abc123def456/start", 200, {**MACHINE, "state": "running"})
    with d.client() as c:
        m = c.machines.create("sample:latest", name="web", cmd=["sleep", "600"],
                              env={"A": "1"}, ports=["8080:80", 81, "10.0.0.1:9000:90"],
                              memory_mib=512, restart="on-failure")
    assert m.state == "running" and m.name == "web"
    body = json.loads(d.sent("POST", "/v1/machines")[0].content)
    # what was given, no more: the daemon applies its defaults (1 vCPU, network user, tcp)
    assert body == {
        "image": "sample:latest", "name": "web", "memory_mib": 512,
        "env": {"A": "1"}, "cmd": ["sleep", "600"],
        "restart": "on-failure", "auto_remove": False, "ports": [
            {"guest_port": 80, "host_port": 8080, "host_ip": "127.0.0.1"},
            {"guest_port": 81, "host_port": 0, "host_ip": "127.0.0.1"},
            {"guest_port": 90, "host_port": 9000, "host_ip": "10.0.0.1"}]}


def test_a_machine_that_fails_to_boot_is_removed_again(d: Daemon) -> None:
    d.on("POST", "/v1/machines", 201, MACHINE)
    d.on("POST", "/v1/machines/abc123def456/start", 500,
         err("machine_crashed", "QEMU exited unexpectedly"))
    d.on("DELETE", "/v1/machines/abc123def456", 204)
    with d.client() as c, pytest.raises(APIError, match="QEMU exited"):
        c.machines.create("sample:latest")
    (delete,) = d.sent("DELETE", "/v1/machines/abc123def456")
    assert delete.url.params["force"] == "true"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ports": ["99999"]}, "guest port '99999'"),
    ({"ports": ["1:2:3:4"]}, "IP:HOST:GUEST"),
    ({"ports": ["localhost:80:80"]}, "not an IPv4"),
    ({"ports": ["80/udp"]}, "only tcp"),
    ({"cmd": "echo hi"}, "list of strings"),
    ({"cpus": 0}, "cpus"),
    ({"name": "../x"}, "name"),
    ({"network": "bridge"}, "bridge"),
])
def test_bad_values_are_refused_before_anything_is_sent(d: Daemon, kwargs: dict[str, Any],
                                                        message: str) -> None:
    with d.client() as c, pytest.raises(InvalidRequest, match=message):
        c.machines.create("sample:latest", **kwargs)
    assert d.requests == []


def test_exec_sends_stdin_and_returns_the_result(d: Daemon) -> None:
    d.on("GET", "/v1/machines/web", 200, MACHINE)
    d.on("POST", "/v1/machines/abc123def456/exec", 200,
         {"exit_code": 3, "stdout": "out\n", "stderr": "", "signal": None})
    with d.client() as c:
        res = c.machines.get("web").exec(["sh", "-c", "cat; exit 3"], stdin=b"in",
                                         env={"K": "V"}, timeout=5)
    assert (res.exit_code, res.stdout) == (3, "out\n")
    body = json.loads(d.sent("POST", "/v1/machines/abc123def456/exec")[0].content)
    assert body == {"cmd": ["sh", "-c", "cat; exit 3"], "env": {"K": "V"}, "tty": False,
                    "stdin": "in", "timeout": 5.0}


def test_image_refs_with_slashes_and_colons_stay_in_the_path(d: Daemon) -> None:
    d.on("DELETE", "/v1/images/reg.io/team/app:1.0", 200, {"untagged": ["reg.io/team/app:1.0"]})
    with d.client() as c:
        assert c.images.remove("reg.io/team/app:1.0").untagged == ["reg.io/team/app:1.0"]
    assert d.requests[0].url.raw_path == b"/v1/images/reg.io/team/app:1.0"
    assert "force" not in d.requests[0].url.params


IMAGE = {"id": "sha256:" + "1" * 64, "short_id": "1" * 12, "tags": ["app:1"], "size": 1,
         "created": "", "layers": 1, "entrypoint": None, "cmd": None, "env": [], "workdir": "",
         "user": ""}


def test_image_tag_remove_and_prune_send_what_the_api_takes(d: Daemon) -> None:
    removal = {"untagged": ["app:1"], "deleted": ["sha256:" + "1" * 64], "space_reclaimed": 42}
    d.on("POST", "/v1/images/app:1/tag", 201, {**IMAGE, "tags": ["app:1", "app:2"]})
    d.on("DELETE", "/v1/images/app:1", 200, removal)
    d.on("POST", "/v1/images/prune", 200, removal)
    with d.client() as c:
        assert c.images.tag("app:1", "app:2").tags == ["app:1", "app:2"]
        r = c.images.remove("app:1", force=True)
        assert (r.untagged, r.deleted, r.space_reclaimed) == \
            (["app:1"], ["sha256:" + "1" * 64], 42)
        assert c.images.prune(all=True).space_reclaimed == 42
        assert c.images.prune().deleted == removal["deleted"]
        with pytest.raises(InvalidRequest, match="tag"):
            c.images.tag("app:1", "")
    tag_req, rm_req, prune_all, prune = d.requests
    assert json.loads(tag_req.content) == {"tag": "app:2"}
    assert rm_req.url.params["force"] == "true"
    assert prune_all.url.params["all"] == "true" and "all" not in prune.url.params

    async def run() -> tuple[list[str], int, int]:
        async with d.aclient() as ac:
            tagged = await ac.images.tag("app:1", "app:2")
            removed = await ac.images.remove("app:1", force=True)
            pruned = await ac.images.prune(all=True)
            return tagged.tags, removed.space_reclaimed, pruned.space_reclaimed

    assert asyncio.run(run()) == (["app:1", "app:2"], 42, 42)
    assert [r.url.params.get("force") or r.url.params.get("all") for r in d.requests[4:]] == \
        [None, "true", "true"]


def test_an_import_reports_the_tags_it_moved(d: Daemon) -> None:
    d.on("POST", "/v1/images/import", 201,
         {**IMAGE, "moved_tags": [{"tag": "app:1", "from_image": "sha256:" + "2" * 64}]})
    with d.client() as c:
        result = c.images.import_path("/srv/app.tar")
    assert [(m.tag, m.from_image) for m in result.moved_tags] == \
        [("app:1", "sha256:" + "2" * 64)]


def test_upload_streams_a_file_with_its_tag(d: Daemon, tmp_path: Path) -> None:
    archive = tmp_path / "img.tar"
    archive.write_bytes(b"x" * 3_000_000)
    image = {"id": "sha256:1", "short_id": "1", "tags": ["app:1"], "size": 1, "created": "",
             "layers": 1, "entrypoint": None, "cmd": None, "env": [], "workdir": "", "user": ""}
    d.on("POST", "/v1/images/upload", 201, image)
    with d.client() as c:
        assert c.images.upload(archive, tag="app:1").tags == ["app:1"]
    req = d.requests[0]
    assert req.url.params["tag"] == "app:1" and req.content == archive.read_bytes()


# ------------------------------------------------------------- streams


def ndjson(*events: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_exec_stream_yields_decoded_bytes_and_the_exit(d: Daemon) -> None:
    d.on("GET", "/v1/machines/web", 200, MACHINE)
    d.on("POST", "/v1/machines/abc123def456/exec/stream", 200, content=ndjson(
        {"type": "started", "pid": 7}, {"type": "stdout", "data": b64(b"\xffbin\n")},
        {"type": "stderr", "data": b64(b"oops")},
        {"type": "exit", "exit_code": 0, "signal": None, "timed_out": False}))
    with d.client() as c:
        events = list(c.machines.get("web").exec_stream(["cat"]))
    assert [(e.type, e.data) for e in events] == [
        ("started", b""), ("stdout", b"\xffbin\n"), ("stderr", b"oops"), ("exit", b"")]
    assert events[0].pid == 7 and events[-1].exit_code == 0 and events[-1].final


def test_events_and_logs_stream(d: Daemon) -> None:
    d.on("GET", "/v1/events", 200, content=ndjson(
        {"seq": 1, "time": "t", "machine_id": "a", "machine": "web", "type": "created"},
        {"seq": 2, "time": "t", "machine_id": "a", "machine": "web", "type": "started"}))
    d.on("GET", "/v1/machines/web", 200, MACHINE)
    d.on("GET", "/v1/machines/abc123def456/logs", 200, content=b"line 1\nline 2\n")
    with d.client() as c:
        assert [e.type for e in c.events(since=0, follow=False)] == ["created", "started"]
        assert b"".join(c.machines.get("web").logs(tail=2)) == b"line 1\nline 2\n"
    assert d.sent("GET", "/v1/events")[0].url.params["since"] == "0"
    assert d.sent("GET", "/v1/machines/abc123def456/logs")[0].url.params["tail"] == "2"


def test_a_stream_refused_by_the_daemon_raises(d: Daemon) -> None:
    d.on("GET", "/v1/machines/web", 200, MACHINE)
    d.on("POST", "/v1/machines/abc123def456/exec/stream", 409,
         err("conflict", "machine web is stopped"))
    with d.client() as c, pytest.raises(Conflict, match="stopped"):
        list(c.machines.get("web").exec_stream(["true"]))


# ------------------------------------------------------------- files, cleanup


def test_put_file_and_get_file_speak_tar(d: Daemon) -> None:
    d.on("GET", "/v1/machines/web", 200, MACHINE)
    d.on("PUT", "/v1/machines/abc123def456/files", 204)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("hosts")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    d.on("GET", "/v1/machines/abc123def456/files", 200, content=buf.getvalue())
    with d.client() as c:
        m = c.machines.get("web")
        m.put_file("etc/app/conf", b"data", mode=0o600)
        assert m.get_file("/etc/hosts") == b"hello"
    put = d.sent("PUT", "/v1/machines/abc123def456/files")[0]
    assert put.url.params["path"] == "/etc/app"
    with tarfile.open(fileobj=io.BytesIO(put.content)) as tf:
        (member,) = tf.getmembers()
        assert (member.name, member.mode, member.uid) == ("conf", 0o600, 0)
        assert tf.extractfile(member).read() == b"data"  # type: ignore[union-attr]
    assert d.sent("GET", "/v1/machines/abc123def456/files")[0].url.params["path"] == \
        "/etc/hosts"


def test_the_context_manager_removes_the_machine_even_on_error(d: Daemon) -> None:
    d.on("POST", "/v1/machines", 201, MACHINE)
    d.on("DELETE", "/v1/machines/abc123def456", 204)
    with d.client() as c, pytest.raises(RuntimeError):
        with c.machines.create("sample:latest", start=False):
            raise RuntimeError("test body failed")
    (delete,) = d.sent("DELETE", "/v1/machines/abc123def456")
    assert delete.url.params["force"] == "true"


def test_the_context_manager_accepts_a_machine_already_gone(d: Daemon) -> None:
    d.on("POST", "/v1/machines", 201, MACHINE)
    with d.client() as c, c.machines.create("sample:latest", start=False) as m:
        assert m.id == "abc123def456"
    assert len(d.sent("DELETE", "/v1/machines/abc123def456")) == 1  # 404: fine


# ------------------------------------------------------------- async


def test_the_async_client_mirrors_the_sync_one(d: Daemon) -> None:
    d.on("POST", "/v1/machines", 201, MACHINE)
    d.on("POST", "/v1/machines/abc123def456/start", 200, {**MACHINE, "state": "running"})
    d.on("POST", "/v1/machines/abc123def456/exec/stream", 200, content=ndjson(
        {"type": "stdout", "data": b64(b"hi\n")}, {"type": "exit", "exit_code": 4}))
    d.on("POST", "/v1/machines/abc123def456/pause", 409, err("conflict", "not running"))
    d.on("DELETE", "/v1/machines/abc123def456", 204)

    async def main() -> list[tuple[str, bytes]]:
        async with d.aclient() as c:
            async with await c.machines.create("sample:latest") as m:
                assert m.state == "running"
                with pytest.raises(Conflict, match="not running"):
                    await m.pause()
                return [(e.type, e.data) async for e in m.exec_stream(["echo", "hi"])]

    assert asyncio.run(main()) == [("stdout", b"hi\n"), ("exit", b"")]
    assert len(d.sent("DELETE", "/v1/machines/abc123def456")) == 1


# ------------------------------------------------------------- public names, start-up


def test_import_ember_stays_light() -> None:
    code = ("import sys, ember; assert 'httpx' not in sys.modules and 'ember.sdk' not in "
            "sys.modules; assert ember.Client is __import__('ember.sdk').sdk.Client; "
            "assert 'httpx' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


STUB = textwrap.dedent("""
    # A stand-in for `ember serve`: answers /v1/version on the data dir's socket.
    import http.server, os, socketserver, sys, time
    home = os.environ["EMBER_HOME"]
    with open(os.path.join(home, "spawns"), "a") as f:
        f.write(f"{os.getpid()}\\n")
    if os.environ.get("STUB_FAIL"):
        print("stub: cannot open the image store", file=sys.stderr)
        sys.exit(3)
    time.sleep(0.3)  # a daemon takes a moment: racing clients must not start another
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"version": "0", "api": "v1", "accel": "tcg", "accel_reason": "stub"}'
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a): pass
        def address_string(self): return "unix"
    class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True
    srv = S(os.path.join(home, "ember.sock"), H)
    srv.timeout = 0.2
    deadline = time.time() + 20
    while time.time() < deadline:
        srv.handle_request()
""")


@pytest.fixture
def stub_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    script = tmp_path / "stub_serve.py"
    script.write_text(STUB)
    monkeypatch.setattr(daemon, "serve_argv", lambda: [sys.executable, str(script)])
    home = tmp_path / "home"
    monkeypatch.setenv("EMBER_HOME", str(home))
    yield home
    for line in (home / "spawns").read_text().split() if (home / "spawns").exists() else []:
        try:
            os.kill(int(line), 9)
        except ProcessLookupError:
            pass
    for proc in daemon._spawned:
        proc.wait(5)


def test_connect_or_start_starts_one_daemon_for_racing_clients(stub_serve: Path) -> None:
    versions: list[str] = []

    def connect() -> None:
        with Client.connect_or_start() as c:
            versions.append(c.version().accel_reason)

    threads = [threading.Thread(target=connect) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert versions == ["stub"] * 3
    assert len((stub_serve / "spawns").read_text().split()) == 1
    assert "started on demand" in (stub_serve / "daemon.log").read_text()


def test_autostart_happens_on_the_first_request(stub_serve: Path) -> None:
    with Client(autostart=True) as c:
        assert c.version().accel == "tcg"


def test_a_daemon_that_cannot_start_is_reported_with_its_log(
        stub_serve: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUB_FAIL", "1")
    with pytest.raises(DaemonUnavailable) as info:
        Client.connect_or_start()
    msg = str(info.value)
    assert "exited with status 3" in msg and "cannot open the image store" in msg
    assert str(stub_serve / "daemon.log") in msg


@pytest.fixture
def held_lock(stub_serve: Path) -> Iterator[Path]:
    """A daemon process for the data dir, as far as the lock says (this test holds it)."""
    import fcntl

    stub_serve.mkdir(parents=True)
    fd = os.open(stub_serve / "daemon.pid", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242\n")
    yield stub_serve
    os.close(fd)


def test_a_daemon_that_is_shutting_down_is_waited_for_not_doubled(held_lock: Path) -> None:
    # The lock is held and nothing listens: a daemon finishing its shutdown.
    with pytest.raises(DaemonUnavailable) as info:
        daemon.ensure_daemon(held_lock / "ember.sock", timeout=5, stop_timeout=0.3)
    assert str(info.value) == (f"the ember daemon (pid 4242) is shutting down and did not exit "
                               f"within 0.3 s; see {held_lock / 'daemon.log'}")
    assert not (held_lock / "spawns").exists()  # no second daemon was tried


def test_a_daemon_that_is_starting_is_waited_for_not_doubled(held_lock: Path) -> None:
    import socket

    # The lock is held and the socket is bound: a daemon loading its state.
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(held_lock / "ember.sock"))
        s.listen(8)
        with pytest.raises(DaemonUnavailable) as info:
            daemon.ensure_daemon(held_lock / "ember.sock", timeout=0.3, stop_timeout=0.3)
    assert str(info.value) == (
        f"the ember daemon (pid 4242) accepts connections on {held_lock / 'ember.sock'} but "
        f"did not answer within 0.3 s; see {held_lock / 'daemon.log'}")
    assert not (held_lock / "spawns").exists()


SNAPSHOT = {"id": "ab" * 16, "kind": "user", "tag": "v1", "parent": "web",
            "created": "2026-12-01T00:00:00.000Z", "image": "sample:latest",
            "image_id": "sha256:x", "cpus": 1, "memory_mib": 256, "network": "user",
            "accel": "tcg", "qemu_version": "7.2", "size_on_disk": 1, "memory_allocated": 1,
            "pause_ms": 20.0, "in_use": False, "clones": []}


def test_snapshots_and_clones_from_both_clients(d: Daemon) -> None:
    d.on("GET", "/v1/machines/web", 200, MACHINE)
    d.on("POST", "/v1/machines/abc123def456/snapshots", 201, SNAPSHOT)
    d.on("POST", "/v1/machines/abc123def456/clone", 201,
         {"snapshot": SNAPSHOT, "machines": [{**MACHINE, "name": "web-1"}]})
    d.on("GET", "/v1/snapshots", 200, [SNAPSHOT])
    d.on("DELETE", "/v1/snapshots/v1", 409, err("conflict", "has clones"))
    d.on("POST", "/v1/machines", 201, {**MACHINE, "snapshot": "ab" * 16})
    with d.client() as c:
        m = c.machines.get("web")
        assert m.snapshot("v1").pause_ms == 20.0
        snap, clones = m.clone(1)
        assert snap.tag == "v1" and [x.name for x in clones] == ["web-1"]
        assert [s.id for s in c.snapshots.list()] == ["ab" * 16]
        with pytest.raises(Conflict, match="has clones"):
            c.snapshots.remove("v1")
        c.machines.create(snapshot="v1", start=False)

    async def main() -> None:
        async with d.aclient() as c:
            m = await c.machines.get("web")
            assert (await m.snapshot()).id == "ab" * 16
            _, clones = await m.clone(1, tag="t")
            assert clones[0].name == "web-1"
            assert len(await c.snapshots.list(all=True)) == 1

    asyncio.run(main())
    sent = [json.loads(r.content) for r in d.sent("POST", "/v1/machines/abc123def456/snapshots")]
    assert sent == [{"tag": "v1"}, {}]
    assert json.loads(d.sent("POST", "/v1/machines/abc123def456/clone")[1].content) == \
        {"count": 1, "tag": "t"}
    # a clone's body names only what was given: the snapshot's shape is the daemon's to apply
    assert json.loads(d.sent("POST", "/v1/machines")[0].content) == \
        {"snapshot": "v1", "restart": "no", "auto_remove": False}
    assert d.sent("GET", "/v1/snapshots")[1].url.params["all"] == "true"


# ------------------------------------------------------------- egress


def test_create_sends_the_egress_policy_normalised(d: Daemon) -> None:
    d.on("POST", "/v1/machines", 201, MACHINE)
    with d.client() as c:
        c.machines.create("sample:latest", start=False,
                          egress={"allow": ["1.1.1.1:53", "10.1.2.3/8"]})
        c.machines.create("sample:latest", start=False, egress={"allow": [], "deny": []})
    first, second = (json.loads(r.content) for r in d.sent("POST", "/v1/machines"))
    assert first["egress"] == {"allow": ["1.1.1.1/32:53", "10.0.0.0/8"], "deny": []}
    assert "egress" not in second  # no rules: no policy


@pytest.mark.parametrize(("egress", "message"), [
    ({"allow": ["::1"]}, "egress rule '::1': IPv6 is not supported"),
    ({"deny": ["1.1.1.1:0"]}, "the port must be between 1 and 65535"),
    ({"allow": "1.1.1.1"}, "egress.allow must be a list of rules"),
    ({"permit": ["1.1.1.1"]}, "permit: unknown field"),
    (["1.1.1.1"], "egress must be"),
    ({"allow": ["1.1.1.1"] * 300}, "egress"),
])
def test_bad_egress_is_refused_before_anything_is_sent(d: Daemon, egress: Any,
                                                       message: str) -> None:
    with d.client() as c:
        with pytest.raises(InvalidRequest, match=message):
            c.machines.create("sample:latest", egress=egress)
        m = MachineHandle(c, models.Machine.model_validate(MACHINE))
        with pytest.raises(InvalidRequest, match=message):
            m.update(egress=egress)
    assert d.requests == []


def test_update_patches_only_what_is_given(d: Daemon) -> None:
    policy = {"allow": ["1.1.1.1/32"], "deny": []}
    d.on("PATCH", "/v1/machines/abc123def456", 200,
         {**MACHINE, "egress": policy, "egress_denied": 3})
    with d.client() as c:
        m = MachineHandle(c, models.Machine.model_validate(MACHINE))
        assert m.info.egress is None and m.info.egress_denied is None
        info = m.update(egress={"allow": ["1.1.1.1"]})
        assert info.egress is not None and info.egress.allow == ["1.1.1.1/32"]
        assert m.info.egress_denied == 3
        m.update(egress=None)
        m.update(egress=models.Egress(deny=["10.1.2.3/8"]))
        m.update()
    bodies = [json.loads(r.content) for r in d.sent("PATCH", "/v1/machines/abc123def456")]
    assert bodies == [{"egress": {"allow": ["1.1.1.1/32"], "deny": []}}, {"egress": None},
                      {"egress": {"allow": [], "deny": ["10.0.0.0/8"]}}, {}]


def test_update_errors_are_the_apis(d: Daemon) -> None:
    d.on("PATCH", "/v1/machines/abc123def456", 409,
         err("conflict", "machine web: egress policies need the tap network"))
    with d.client() as c:
        m = MachineHandle(c, models.Machine.model_validate(MACHINE))
        with pytest.raises(Conflict, match="egress policies need"):
            m.update(egress={"deny": ["1.1.1.1"]})


def test_the_async_client_creates_and_updates_with_egress(d: Daemon) -> None:
    d.on("POST", "/v1/machines", 201, MACHINE)
    d.on("PATCH", "/v1/machines/abc123def456", 200,
         {**MACHINE, "egress": {"allow": [], "deny": ["10.0.0.0/8"]}})

    async def main() -> Any:
        async with d.aclient() as c:
            m = await c.machines.create("sample:latest", start=False,
                                        egress={"deny": ["10.0.0.0/8"]})
            with pytest.raises(InvalidRequest, match="IPv6"):
                await m.update(egress={"deny": ["::/0"]})
            return await m.update(egress={"deny": ["10.0.0.0/8"]})

    info = asyncio.run(main())
    assert info.egress.deny == ["10.0.0.0/8"]
    assert json.loads(d.sent("POST", "/v1/machines")[0].content)["egress"] == {
        "allow": [], "deny": ["10.0.0.0/8"]}
    assert [json.loads(r.content) for r in d.sent("PATCH", "/v1/machines/abc123def456")] == [
        {"egress": {"allow": [], "deny": ["10.0.0.0/8"]}}]
