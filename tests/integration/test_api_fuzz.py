"""The REST API fuzzed from its OpenAPI document alone, against a real daemon.

Schemathesis reads ``/openapi.json`` from the session's ``ember serve`` and
sends generated requests over its Unix socket: its coverage phase (every
boundary and every violated keyword of each operation, once) and then random
valid and invalid cases. Every
answer must be documented: no 5xx, a documented status code and content type,
and a JSON body that matches the documented schema; a request that violates the
document is refused (4xx), never answered 2xx. Two machines give the
state-dependent routes something real to act on: ``fz-created`` (never
started) and ``fz-running`` (main process ``sleep 3600``); generated machine
names are sometimes replaced by theirs, and image refs by ``sample:latest``.
The session's images, which later modules boot, survive the image routes
(``DELETE /v1/images/{ref}?force=true``, ``POST /v1/images/prune?all=true``,
tags moved): machines hold both (``fz-entry`` holds ``entry:latest``), so they
are never deleted, and their tags are put back after each operation.

Not fuzzed: ``follow=true`` on ``/logs`` and ``/events`` (such a stream only
ends when the machine stops or the client leaves, so every case sends
``follow=false``), and the WebSocket exec, which is not in the document.

A valid clone count is lowered to 1 (up to 256 clones per case is more than two
cores start in a test's time), and the snapshots the fuzzer takes are removed
after each operation.

The classic bad inputs (path characters in names, huge numbers, wrong types,
non-object bodies, a 10 MiB body...) are asserted one by one at the end.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import requests
import schemathesis
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from requests.adapters import HTTPAdapter
from schemathesis import checks as st_checks
from schemathesis.generation.modes import GenerationMode

if TYPE_CHECKING:
    from conftest import Daemon

# Archives are opaque bytes to a client that only has the document.
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")

BASE = "http://ember"
CREATED, RUNNING, HOLDER = "fz-created", "fz-running", "fz-entry"
#: The session's images (tests/integration/conftest.py) and the machine holding each.
SESSION_IMAGES = {"sample:latest": CREATED, "entry:latest": HOLDER}
#: Generated cases per operation and generation mode (positive, negative), on top of the
#: ~680 cases of the coverage phase: about 50 s for the whole module on 2 idle cores.
#: EMBER_FUZZ_EXAMPLES=N fuzzes longer; EMBER_FUZZ_RANDOM=1 draws new cases on every run
#: (by default the cases are the same every run, so the suite is repeatable).
MAX_EXAMPLES = int(os.environ.get("EMBER_FUZZ_EXAMPLES", "80"))
DERANDOMIZE = not os.environ.get("EMBER_FUZZ_RANDOM")
#: negative_data_rejection: a request that violates the document must not be answered 2xx.
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance,
          st_checks.content_type_conformance, st_checks.response_schema_conformance,
          st_checks.negative_data_rejection]


# --- requests over the daemon's Unix socket (schemathesis speaks `requests`)


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__("localhost", **kwargs)
        self._uds = path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if isinstance(self.timeout, int | float):
            sock.settimeout(self.timeout)
        sock.connect(self._uds)
        return sock


class _UnixPool(urllib3.HTTPConnectionPool):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", maxsize=4)
        self._uds = path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self._uds, timeout=self.timeout.connect_timeout)


class _UnixAdapter(HTTPAdapter):
    def __init__(self, path: str) -> None:
        super().__init__()
        self._pool = _UnixPool(path)

    def get_connection_with_tls_context(self, *args: Any, **kwargs: Any) -> Any:
        return self._pool

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


@pytest.fixture(scope="module")
def session(daemon: Daemon) -> Iterator[requests.Session]:
    s = requests.Session()
    s.trust_env = False  # no proxies from the environment
    s.mount(BASE, _UnixAdapter(str(daemon.socket)))
    yield s
    s.close()


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.http() as c:
        yield c


# --- the schema, as a client that never saw the code gets it


def _with_our_names(ctx: Any, params: dict[str, Any] | None) -> Any:
    if not isinstance(params, dict):
        return st.just(params)
    if "name" in params:
        if ctx.operation is not None and ctx.operation.path.endswith("/wait"):
            # A wait on a running machine lasts as long as it runs; a generated name may
            # be an id prefix of one ("0"): only the created machine answers at once.
            return st.just({**params, "name": CREATED})
        return st.sampled_from([params, {**params, "name": CREATED},
                                {**params, "name": RUNNING}])
    if "ref" in params and ctx.operation is not None and ctx.operation.method.upper() == "GET":
        return st.sampled_from([params, {**params, "ref": "sample:latest"}])
    return st.just(params)


def _with_our_image(ctx: Any, body: Any) -> Any:
    op = ctx.operation
    # Only a valid image is replaced: a case made negative by its image stays negative
    # (else negative_data_rejection would see a valid request, rightly accepted).
    if op is not None and op.path == "/v1/machines" and isinstance(body, dict) \
            and isinstance(body.get("image"), str) and 1 <= len(body["image"]) <= 512:
        return st.sampled_from([body, {**body, "image": "sample:latest"}])
    return st.just(body)


@pytest.fixture(scope="module")
def ember_schema(daemon: Daemon) -> Any:
    with daemon.http() as c:
        doc = c.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    schema.hook("flatmap_path_parameters")(_with_our_names)
    schema.hook("flatmap_body")(_with_our_image)
    return schema


def _operations() -> list[str]:
    """The operations of the committed document (a unit test keeps it equal to the served one)."""
    doc = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json").read_text())
    return [f"{method.upper()} {path}" for path, ops in doc["paths"].items() for method in ops]


def _ensure(api: httpx.Client, name: str, running: bool, image: str = "sample:latest") -> None:
    r = api.get(f"/v1/machines/{name}")
    state = r.json()["state"] if r.status_code == 200 else None
    if state in (("running", "paused") if running else ("created",)):
        return
    if state is not None:
        assert api.delete(f"/v1/machines/{name}", params={"force": "true"}).status_code == 204
    body: dict[str, Any] = {"image": image, "name": name}
    if running:
        body["cmd"] = ["sleep", "3600"]
    r = api.post("/v1/machines", json=body)
    assert r.status_code == 201, r.text
    if running:
        r = api.post(f"/v1/machines/{name}/start")
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def session_images(api: httpx.Client) -> dict[str, str]:
    """Tag -> id of the session's images, as the fuzz run found them."""
    out = {}
    for tag in SESSION_IMAGES:
        r = api.get(f"/v1/images/{tag}")
        assert r.status_code == 200, r.text
        out[tag] = r.json()["id"]
    return out


@pytest.fixture
def fuzz_machines(api: httpx.Client, session_images: dict[str, str]) -> Iterator[None]:
    """The machines in their state before each operation; machines the fuzzer made go
    after, and the session's images get their tags back."""
    before = {m["id"] for m in api.get("/v1/machines").json()}
    _ensure(api, CREATED, running=False)
    _ensure(api, RUNNING, running=True)
    _ensure(api, HOLDER, running=False, image="entry:latest")
    yield
    for m in api.get("/v1/machines").json():
        if m["id"] not in before and m["name"] not in (CREATED, RUNNING, HOLDER):
            # gone for sure: a machine left behind (still starting, say) would answer to
            # its name in later tests
            for _ in range(50):
                r = api.delete(f"/v1/machines/{m['id']}", params={"force": "true"})
                if r.status_code in (204, 404):
                    break
                time.sleep(0.2)
    for snap in api.get("/v1/snapshots").json():  # the fuzzer's (each holds ~25 MB)
        api.delete(f"/v1/snapshots/{snap['id']}", params={"force": "true"})
    for tag, image_id in session_images.items():
        r = api.post(f"/v1/images/{image_id}/tag", json={"tag": tag})
        assert r.status_code == 201, f"the session image {tag} is gone: {r.text}"


@pytest.fixture(scope="module", autouse=True)
def _cleanup(api: httpx.Client) -> Iterator[None]:
    yield
    for name in (CREATED, RUNNING, HOLDER):
        api.delete(f"/v1/machines/{name}", params={"force": "true"})


# --- the fuzz run


def _exchange(case: Any, session: requests.Session) -> None:
    """Send one case; its answer must be documented, and an error must be our one-line body."""
    if case.path in ("/v1/machines/{name}/logs", "/v1/events"):
        case.query = {**(case.query or {}), "follow": "false"}
    count = case.body.get("count") if isinstance(case.body, dict) else None
    if case.path.endswith("/clone") and type(count) is int and 1 < count <= 256:
        # a valid count stays valid: one clone is what two cores can start per case
        case.body = {**case.body, "count": 1}
    response = case.call(base_url=BASE, session=session, timeout=60)
    case.validate_response(response, checks=CHECKS)
    if response.status_code >= 400:
        ctype = (response.headers.get("content-type") or [""])[0]
        _check_error_body(response.status_code, ctype, response.content)


def _coverage_cases(op: Any) -> list[Any]:
    """Schemathesis's coverage phase: every boundary and every violated keyword, once."""
    from schemathesis.generation.drivers import CoverageGenerator
    from schemathesis.generation.feedback import FeedbackSources
    from schemathesis.generation.overrides import Override

    gen = op.schema.config.generation_for(operation=op, phase="coverage")
    return list(CoverageGenerator(operation=op, generation_modes=gen.modes,
                                  generation_config=gen, auth_storage=None,
                                  override=Override(), feedback=FeedbackSources()))


@pytest.mark.parametrize("mode", ["coverage", GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("label", _operations())
def test_api_conforms_to_its_document(ember_schema: Any, session: requests.Session,
                                      fuzz_machines: None, label: str,
                                      mode: GenerationMode | str) -> None:
    op = ember_schema.find_operation_by_label(label)
    assert op is not None, f"{label} is committed but not served"
    try:
        if mode == "coverage":
            failures = []
            for case in _coverage_cases(op):
                try:
                    _exchange(case, session)
                except (Exception, BaseExceptionGroup) as exc:  # a FailureGroup, a timeout...
                    failures.append(f"{case.as_curl_command(base_url=BASE)}\n{exc}")
            assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(failures[:5])
            return

        @given(op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=DERANDOMIZE,
                  database=None, suppress_health_check=list(HealthCheck))
        def fuzz(case: Any) -> None:
            _exchange(case, session)

        fuzz()
    except Unsatisfiable:
        pytest.skip(f"{label}: no {mode} case can be generated (nothing to violate)")


# --- the classic bad inputs, one by one


def _check_error_body(status: int, ctype: str, content: bytes) -> str:
    assert ctype.startswith("application/json"), (status, ctype, content[:200])
    body = json.loads(content)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    msg = body["error"]["message"]
    assert isinstance(msg, str) and msg and "\n" not in msg, body
    return msg


def err(r: httpx.Response, *statuses: int) -> str:
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    return _check_error_body(r.status_code, r.headers.get("content-type", ""), r.content)


@pytest.mark.parametrize("name", ["../x", "a/b", "%2e%2e", "..", "a%2Fb", "x" * 64, " "])
def test_names_with_path_characters(api: httpx.Client, name: str) -> None:
    err(api.post("/v1/machines", json={"image": "sample:latest", "name": name}), 422)


@pytest.mark.parametrize("path", ["../x", "a/b", "%2e%2e", "%2e%2e%2fetc", "..%2f..%2fetc"])
def test_path_characters_in_urls(api: httpx.Client, path: str) -> None:
    for method, suffix in [("GET", ""), ("POST", "/start"), ("DELETE", ""),
                           ("GET", "/logs"), ("POST", "/kill")]:
        r = api.request(method, f"/v1/machines/{path}{suffix}")
        err(r, 404, 405, 422)
    err(api.get(f"/v1/images/{path}"), 404, 422)


@pytest.mark.parametrize("body", [
    {"cpus": 10**30}, {"cpus": "two"}, {"memory_mib": -1}, {"memory_mib": 2**64},
    {"cpus": 1.5}, {"cpus": None}, {"env": []}, {"env": {"A": 1}}, {"cmd": "sh"},
    {"cmd": [1]}, {"ports": [{"guest_port": 0}]}, {"ports": [{"guest_port": 70000}]},
    {"ports": [{"guest_port": 80, "host_ip": "999.999.999.999"}]}, {"unknown": 1},
    {"restart": "sometimes"}, {"hostname": "-bad-"}, {"network": "host"}, {"workdir": "rel"},
])
def test_out_of_range_and_wrong_types(api: httpx.Client, body: dict[str, Any]) -> None:
    err(api.post("/v1/machines", json={"image": "sample:latest", **body}), 422)


@pytest.mark.parametrize("raw", [b"[]", b'"x"', b"null", b"1", b"", b"{", b"\xff\xfe"])
def test_non_object_and_broken_bodies(api: httpx.Client, raw: bytes) -> None:
    headers = {"content-type": "application/json"}
    for path in ("/v1/machines", f"/v1/machines/{CREATED}/exec", "/v1/images/import"):
        err(api.post(path, content=raw, headers=headers), 400, 422)


def test_wrong_content_type_and_huge_bodies(api: httpx.Client) -> None:
    body = json.dumps({"image": "sample:latest"}).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        err(api.post("/v1/machines", content=body, headers={"content-type": ctype}), 422)
    err(api.post("/v1/machines", content=body, headers={}), 422)
    json_ = {"content-type": "application/json"}
    for big in ({"image": "sample:latest", "env": {"A": "x" * (10 << 20)}},
                {"image": "sample:latest", "cmd": ["x" * (10 << 20)]},
                {"image": "x" * (10 << 20)}):
        raw = json.dumps(big).encode()
        assert len(raw) > 10 << 20
        # over the 1 MiB of a JSON body: refused before it is parsed
        assert "larger than 1 MiB" in err(api.post("/v1/machines", content=raw,
                                                   headers=json_), 413)
    # 10 MiB of stdin is a valid exec (exec bodies may have 128 MiB); this machine is not
    # running.
    raw = json.dumps({"cmd": ["cat"], "stdin": "y" * (10 << 20)}).encode()
    _ensure(api, CREATED, running=False)
    err(api.post(f"/v1/machines/{CREATED}/exec", content=raw, headers=json_), 409)


def test_actions_in_the_wrong_state(api: httpx.Client) -> None:
    _ensure(api, CREATED, running=False)
    msg = err(api.post(f"/v1/machines/{CREATED}/exec", json={"cmd": ["true"]}), 409)
    assert "exec needs it running" in msg
    err(api.post(f"/v1/machines/{CREATED}/exec/stream", json={"cmd": ["true"]}), 409)
    for action in ("pause", "resume", "kill"):
        err(api.post(f"/v1/machines/{CREATED}/{action}"), 409)
    err(api.get(f"/v1/machines/{CREATED}/files", params={"path": "/etc"}), 409)
    err(api.put(f"/v1/machines/{CREATED}/files", params={"path": "/tmp"}, content=b""), 409, 422)
