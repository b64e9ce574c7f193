"""The REST API's contract without booting anything: validation, errors, the OpenAPI document.

A real Manager over a temporary data dir; machines are created but never
started, so every route that needs a running machine answers 409 here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_helpers import err, sample_manager
from fastapi.testclient import TestClient

from ember.api import openapi
from ember.api.app import _error, create_app
from ember.daemon.server import TokenAuth

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with sample_manager(tmp_path_factory) as mgr, \
            TestClient(create_app(mgr), raise_server_exceptions=False) as c:
        yield c


def test_committed_openapi_document_is_the_served_one(client: TestClient) -> None:
    served = client.get("/openapi.json").json()
    committed = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert served == committed, "regenerate: python -m ember.api.openapi > docs/openapi.json"
    assert openapi.document() == served


def test_every_operation_documents_its_errors() -> None:
    doc = openapi.document()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status in ("400", "404", "409", "422", "500"):
                schema = op["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
    assert "HTTPValidationError" not in doc["components"]["schemas"]


def test_bad_json_unknown_fields_and_ranges(client: TestClient) -> None:
    r = client.post("/v1/machines", content=b"{not json",
                    headers={"content-type": "application/json"})
    assert err(r, 400, "bad_request") == "request body is not valid JSON"
    msg = err(client.post("/v1/machines", json={"image": "sample", "cpu": 2}), 422, "invalid")
    assert msg == "cpu: unknown field"
    err(client.post("/v1/machines", json={"image": "sample", "cpus": 0}), 422)
    err(client.post("/v1/machines", json={"image": "sample", "cpus": 10**30}), 422)
    err(client.post("/v1/machines", json={"image": "sample", "cpus": "two"}), 422)
    err(client.post("/v1/machines", json={"image": "sample", "cpus": True}), 422)
    err(client.post("/v1/machines", json={"image": "sample", "cpus": 1.5}), 422)
    err(client.post("/v1/machines", json={"image": "sample", "memory_mib": 1}), 422)
    err(client.post("/v1/machines", json=[]), 422)
    err(client.post("/v1/machines", json={"image": "sample", "env": {"A=B": "x"}}), 422)
    err(client.post("/v1/machines", json={"image": "sample", "workdir": "relative"}), 422)
    msg = err(client.post("/v1/machines", json={"image": "sample", "cpus": 64}), 422)
    assert "more than the host's" in msg


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden", "", "x" * 64, "a b", "é"])
def test_names_with_path_characters_are_refused(client: TestClient, name: str) -> None:
    err(client.post("/v1/machines", json={"image": "sample", "name": name}), 422)


def test_unknown_things_are_404(client: TestClient) -> None:
    assert "nope" in err(client.post("/v1/machines", json={"image": "nope:1"}), 404)
    for method, path in [("GET", ""), ("POST", "/start"), ("POST", "/stop"),
                         ("POST", "/kill"), ("POST", "/pause"), ("POST", "/resume"),
                         ("DELETE", ""), ("GET", "/logs")]:
        r = client.request(method, f"/v1/machines/ghost{path}")
        assert err(r, 404, "not_found") == "no machine named 'ghost'"
    err(client.get("/v1/images/ghost:1"), 404)
    err(client.get("/v1/no/such/route"), 404)


def test_wrong_state_is_409_and_names_are_unique(client: TestClient) -> None:
    r = client.post("/v1/machines", json={"image": "sample:latest", "name": "idle"})
    assert r.status_code == 201
    m = r.json()
    assert m["state"] == "created" and m["hostname"] == "idle" and m["image"] == "sample:latest"
    assert "exists already" in err(client.post("/v1/machines",
                                               json={"image": "sample", "name": "idle"}), 409)
    msg = err(client.post("/v1/machines/idle/exec", json={"cmd": ["true"]}), 409, "conflict")
    assert msg == "machine idle is created: exec needs it running"
    err(client.post("/v1/machines/idle/pause"), 409)
    err(client.get("/v1/machines/idle/files", params={"path": "/etc"}), 409)
    err(client.delete("/v1/images/sample:latest"), 409)  # used by a machine
    assert client.get(f"/v1/machines/{m['id']}").json()["name"] == "idle"
    assert client.get(f"/v1/machines/{m['id'][:6]}").json()["name"] == "idle"
    assert client.delete("/v1/machines/idle").status_code == 204
    err(client.get("/v1/machines/idle"), 404)


@pytest.mark.parametrize("extra", [
    {"tty": 1}, {"tty": "yes"}, {"tty": "true"}, {"tty": None},  # the document: boolean
    {"timeout": True}, {"timeout": "5"}, {"timeout": 0}, {"timeout": -1},  # number > 0
])
def test_exec_fields_take_only_their_documented_types(client: TestClient,
                                                      extra: dict[str, Any]) -> None:
    # Found by the fuzz test's negative_data_rejection: pydantic's lax mode took
    # `"timeout": true` (as 1 s) and `"tty": 1`. A machine that is not running
    # would answer 409: the body is refused before that.
    r = client.post("/v1/machines", json={"image": "sample:latest", "name": "typed"})
    assert r.status_code in (201, 409)
    err(client.post("/v1/machines/typed/exec", json={"cmd": ["true"], **extra}), 422, "invalid")
    err(client.post("/v1/machines/typed/exec", json={"cmd": ["true"], "timeout": 5}), 409)


def test_ports_need_a_network(client: TestClient) -> None:
    body = {"image": "sample", "network": "none", "ports": [{"guest_port": 80}]}
    assert "network none" in err(client.post("/v1/machines", json=body), 422)
    body = {"image": "sample", "ports": [{"guest_port": 80, "host_port": 99999}]}
    err(client.post("/v1/machines", json=body), 422)


def test_events_replay(client: TestClient) -> None:
    client.post("/v1/machines", json={"image": "sample", "name": "ev1"})
    client.delete("/v1/machines/ev1")
    lines = client.get("/v1/events", params={"since": 0, "follow": "false"}).text.splitlines()
    mine = [json.loads(x)["type"] for x in lines if json.loads(x)["machine"] == "ev1"]
    assert mine == ["created", "deleted"]


def test_images_listed_and_inspected(client: TestClient) -> None:
    (img,) = client.get("/v1/images").json()
    assert img["tags"] == ["sample:latest"] and img["cmd"] == ["/app/hello.sh"]
    assert client.get(f"/v1/images/{img['short_id']}").json()["id"] == img["id"]
    err(client.post("/v1/images/import", json={"path": "/nonexistent"}), 422)
    err(client.post("/v1/images/upload", content=b"not a tar"), 422)


def test_image_routes_untag_and_delete_as_docker_does(client: TestClient,
                                                    tmp_path: Path) -> None:
    from images_helpers import file, write_oci_layout

    lay = write_oci_layout(tmp_path / "l", [[file("x", b"x")]], {"Cmd": ["/x"]})
    r = client.post("/v1/images/import", json={"path": str(lay), "tag": "u:1"})
    assert r.status_code == 201 and r.json()["moved_tags"] == []
    image_id = r.json()["id"]
    r = client.post("/v1/images/u:1/tag", json={"tag": "u:2"})
    assert r.status_code == 201 and r.json()["tags"] == ["u:1", "u:2"]
    assert err(client.post("/v1/images/u:1/tag", json={"tag": "u:3", "x": 1}),
               422) == "x: unknown field"
    err(client.post("/v1/images/ghost:1/tag", json={"tag": "u:3"}), 404)
    assert "has 2 tags (u:1, u:2)" in err(client.delete(f"/v1/images/{image_id}"), 409,
                                          "conflict")
    assert client.post("/v1/machines", json={"image": "u:1", "name": "holds-u"}).status_code \
        == 201
    r = client.delete("/v1/images/u:2")
    assert r.status_code == 200
    assert r.json() == {"untagged": ["u:2"], "deleted": [], "space_reclaimed": 0}
    assert "used by machine holds-u" in err(client.delete("/v1/images/u:1"), 409, "conflict")
    r = client.delete("/v1/images/u:1", params={"force": "true"})
    assert r.json() == {"untagged": ["u:1"], "deleted": [], "space_reclaimed": 0}
    assert client.get(f"/v1/images/{image_id}").json()["tags"] == []
    assert image_id not in client.post("/v1/images/prune").json()["deleted"]
    assert client.delete("/v1/machines/holds-u").status_code == 204
    r = client.post("/v1/images/prune")
    assert r.status_code == 200 and r.json()["deleted"] == [image_id]
    assert r.json()["space_reclaimed"] > 0
    assert [i["tags"] for i in client.get("/v1/images").json()] == [["sample:latest"]]


def test_token_auth_only_guards_tcp() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["path"])

    sent: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    async def receive() -> dict[str, Any]:
        return {}

    auth = TokenAuth(app, "tok")

    def call(server: Any, headers: list[tuple[bytes, bytes]]) -> None:
        scope = {"type": "http", "path": "/x", "server": server, "headers": headers}
        asyncio.run(auth(scope, receive, send))

    call(("/run/ember.sock", None), [])                    # Unix socket: no token needed
    call(("127.0.0.1", 7777), [(b"authorization", b"Bearer tok")])
    assert seen == ["/x", "/x"]
    call(("127.0.0.1", 7777), [(b"authorization", b"Bearer nope")])
    call(("127.0.0.1", 7777), [])
    assert seen == ["/x", "/x"]
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [401, 401]


def test_fuzz_findings_are_4xx_with_one_line_messages(client: TestClient) -> None:
    # Found by tests/integration/test_api_fuzz.py: a seq beyond SQLite's INTEGER was a 500.
    err(client.get("/v1/events", params={"since": 10**30, "follow": "false"}), 422, "invalid")
    # A client's newline came back inside the message.
    assert "'/\\n' does not exist" in err(client.post("/v1/images/import",
                                                   json={"path": "/\n"}), 422, "invalid")
    assert "must be absolute" in err(client.post("/v1/images/import", json={"path": "rel/x"}),
                                     422, "invalid")
    # And whatever else a message quotes, it leaves as one line.
    assert json.loads(_error(409, "conflict", "a\nb\r\n c").body)["error"]["message"] == "a b c"


@pytest.mark.parametrize("body", [
    {"ports": [{"guest_port": 80, "host_ip": "999.999.999.999"}]},  # was a 201, failing at start
    {"env": {"A": "x" * (128 << 10)}},                                 # E2BIG at start
    {"cmd": ["echo", "x" * (128 << 10)]},
])
def test_values_the_guest_cannot_take_are_refused_at_create(client: TestClient,
                                                            body: dict[str, Any]) -> None:
    err(client.post("/v1/machines", json={"image": "sample:latest", **body}), 422, "invalid")


def test_lone_surrogates_are_refused(client: TestClient) -> None:
    # JSON may carry "\ud800", which no guest can take as UTF-8.
    for raw in (b'{"image": "sample:latest", "cmd": ["\\ud800"]}',
                b'{"image": "sample:latest", "env": {"A": "\\udc00"}}'):
        r = client.post("/v1/machines", content=raw, headers={"content-type": "application/json"})
        assert "not valid Unicode" in err(r, 422, "invalid")


def test_import_of_an_impossible_path_is_422(client: TestClient) -> None:
    # Found by the fuzz test: a name longer than 255 bytes made exists() raise, a 500.
    msg = err(client.post("/v1/images/import", json={"path": "/" + "0" * 300}), 422, "invalid")
    assert "File name too long" in msg


@pytest.mark.timeout(60)  # a writer that never gives up blocks forever
def test_a_client_that_stops_reading_cannot_stall_the_agent_for_long() -> None:
    import threading

    from ember.api.app import _Pipe

    async def scenario() -> tuple[bool, list[str]]:
        pipe = _Pipe(asyncio.get_running_loop(), window=1000, stall=0.3)

        def writer() -> None:
            for _ in range(10):
                pipe.put("stdout", b"x" * 600, 600)  # the reader never drains
            pipe.put("end", {"type": "exit"})

        # A daemon thread, not asyncio.to_thread: on a regression the timeout
        # fails the test, and asyncio.run does not then wait for a stuck writer.
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        while t.is_alive():  # ends: the writer gave up waiting
            await asyncio.sleep(0.01)
        kinds = []
        while True:
            kind, _ = await pipe.get()
            kinds.append(kind)
            if kind == "end":
                break
        return pipe.overflowed, kinds

    overflowed, kinds = asyncio.run(scenario())
    assert overflowed
    assert kinds == ["stdout", "stdout", "end"]  # the window's worth, then the exit


def test_token_auth_closes_an_unauthenticated_websocket_with_1008() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("reached the app without the token")

    sent: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    scope = {"type": "websocket", "path": "/v1/machines/x/exec/ws",
             "server": ("127.0.0.1", 7777), "headers": [(b"authorization", b"Bearer nope")]}
    asyncio.run(TokenAuth(app, "tok")(scope, receive, send))
    # accepted first: a close before the accept would be a bare HTTP 403 to the client
    assert sent == [{"type": "websocket.accept"},
                    {"type": "websocket.close", "code": 1008,
                     "reason": "missing or wrong bearer token"}]


def test_the_token_says_where_it_comes_from_and_an_empty_file_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.daemon.server import load_token
    from ember.errors import EmberError

    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    monkeypatch.delenv("EMBER_TOKEN", raising=False)
    assert load_token("given") == ("given", "--token")
    token, source = load_token()
    assert source == f"{tmp_path / 'token'} (created)"
    assert oct((tmp_path / "token").stat().st_mode & 0o777) == "0o600"
    assert load_token() == (token, str(tmp_path / "token"))
    monkeypatch.setenv("EMBER_TOKEN", "from-env")
    assert load_token() == ("from-env", "$EMBER_TOKEN")
    monkeypatch.delenv("EMBER_TOKEN")
    (tmp_path / "token").write_text("\n")  # would have let "Bearer " in
    with pytest.raises(EmberError, match="is empty"):
        load_token()
