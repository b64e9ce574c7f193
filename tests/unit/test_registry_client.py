"""The registry client against answers a real registry does not give: a small HTTP server
on 127.0.0.1 in the test plays the registry (schema 1, oversized and lying manifests,
redirect loops, a body that stops early); plus the header parsers."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ember.errors import RegistryError, RegistryNotFound
from ember.images import oci
from ember.images.registry.client import (
    MAX_MANIFEST,
    RegistryClient,
    parse_challenge,
    retry_after,
)

Reply = tuple[int, dict[str, str], bytes]


class Stub:
    """Answers GET /v2/... with what ``route(path)`` returns; counts requests."""

    def __init__(self, route: Callable[[str], Reply]) -> None:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                stub.paths.append(self.path)
                status, headers, body = route(self.path)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.paths: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Callable[[Callable[[str], Reply]], RegistryClient]]:
    stubs: list[Stub] = []
    clients: list[RegistryClient] = []

    def make(route: Callable[[str], Reply]) -> RegistryClient:
        def full(path: str) -> Reply:
            return (200, {}, b"{}") if path == "/v2/" else route(path)
        s = Stub(full)
        stubs.append(s)
        c = RegistryClient(s.host, plain_http_ok=True, sleep=lambda _s: None)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()
    for s in stubs:
        s.close()


MANIFEST = json.dumps({
    "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
    "config": {"mediaType": oci.OCI_CONFIG, "digest": "sha256:" + "a" * 64, "size": 2},
    "layers": []}).encode()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_manifest_is_fetched_and_checked(stub: Callable[..., RegistryClient]) -> None:
    c = stub(lambda p: (200, {"Content-Type": oci.OCI_MANIFEST,
                              "Docker-Content-Digest": digest(MANIFEST)}, MANIFEST))
    data, media_type, got = c.manifest("x", "1")
    assert (data, media_type, got) == (MANIFEST, oci.OCI_MANIFEST, digest(MANIFEST))


def test_schema1_is_refused_with_one_line(stub: Callable[..., RegistryClient]) -> None:
    body = json.dumps({"schemaVersion": 1, "name": "x", "tag": "1", "fsLayers": []}).encode()
    c = stub(lambda p: (200, {"Content-Type":
                              "application/vnd.docker.distribution.manifest.v1+prettyjws"},
                        body))
    with pytest.raises(RegistryError, match="schema 1 manifest") as info:
        c.manifest("x", "1")
    assert "\n" not in str(info.value)


def test_an_oversized_manifest_is_refused_before_it_is_read(
        stub: Callable[..., RegistryClient]) -> None:
    c = stub(lambda p: (200, {"Content-Type": oci.OCI_MANIFEST,
                              "Content-Length": str(MAX_MANIFEST + 1)}, b""))
    with pytest.raises(RegistryError, match="too large"):
        c.manifest("x", "1")


def test_a_manifest_that_is_not_what_was_asked_for(stub: Callable[..., RegistryClient]) -> None:
    c = stub(lambda p: (200, {"Content-Type": oci.OCI_MANIFEST,
                              "Docker-Content-Digest": "sha256:" + "b" * 64}, MANIFEST))
    with pytest.raises(RegistryError, match="does not match the digest the registry gave"):
        c.manifest("x", "1")
    with pytest.raises(RegistryError, match="does not match its digest"):
        c.manifest("x", "sha256:" + "c" * 64)
    index_typed = stub(lambda p: (200, {"Content-Type": oci.OCI_INDEX}, MANIFEST))
    with pytest.raises(RegistryError, match="the registry says .*index.* but the document"):
        index_typed.manifest("x", "1")


def test_a_redirect_loop_ends_with_one_line(stub: Callable[..., RegistryClient]) -> None:
    c = stub(lambda p: (307, {"Location": p}, b""))
    with pytest.raises(RegistryError, match="too many redirects"):
        c.manifest("x", "1")


def test_unknown_manifest_carries_the_registry_message(
        stub: Callable[..., RegistryClient]) -> None:
    err = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN",
                                  "message": "manifest unknown"}]}).encode()
    c = stub(lambda p: (404, {"Content-Type": "application/json"}, err))
    with pytest.raises(RegistryNotFound, match=r"manifest unknown \(MANIFEST_UNKNOWN\)"):
        c.manifest("x", "nope")


def test_5xx_is_retried_then_reported(stub: Callable[..., RegistryClient]) -> None:
    calls: list[str] = []

    def route(p: str) -> Reply:
        calls.append(p)
        return 503, {"Retry-After": "0"}, b""

    c = stub(route)
    with pytest.raises(RegistryError, match="503"):
        c.manifest("x", "1")
    assert len(calls) == 5


def test_a_blob_body_that_stops_early_is_resumed_then_given_up(
        stub: Callable[..., RegistryClient], tmp_path: Path) -> None:
    data = b"x" * 10000
    desc = oci.Descriptor("application/octet-stream", digest(data), len(data))

    def short(p: str) -> Reply:  # promises the whole blob, sends half, never resumes
        return 200, {"Content-Length": str(len(data))}, data[:5000]

    c = stub(short)
    part = tmp_path / "blob.part"
    with pytest.raises(RegistryError, match="attempts|stopped early"):
        c.fetch_blob("x", desc, part)


def test_a_blob_of_the_wrong_content_empties_its_part_file(
        stub: Callable[..., RegistryClient], tmp_path: Path) -> None:
    data = b"y" * 3000
    desc = oci.Descriptor("application/octet-stream", digest(b"z" * 3000), 3000)
    c = stub(lambda p: (200, {}, data))
    part = tmp_path / "blob.part"
    with pytest.raises(RegistryError, match="does not match its digest"):
        c.fetch_blob("x", desc, part)
    assert part.stat().st_size == 0  # nothing of it is trusted by a later resume


def test_challenge_and_retry_after_parsing() -> None:
    ch = parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                         'scope="repository:a/b:pull"')
    assert ch is not None and ch.scheme == "bearer"
    assert ch.params == {"realm": "https://auth.example/token", "service": "reg",
                         "scope": "repository:a/b:pull"}
    basic = parse_challenge('Basic realm="ember"')
    assert basic is not None and basic.scheme == "basic" and basic.params["realm"] == "ember"
    assert retry_after("7", 1.0) == 7.0
    assert retry_after(None, 1.5) == 1.5
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 2.0) == 0.0  # in the past
    assert retry_after("soon", 3.0) == 3.0
