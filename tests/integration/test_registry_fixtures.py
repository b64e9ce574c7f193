"""The registry fixtures themselves work: checked with curl, skopeo and plain httpx only.

No microVM is booted here; each registry is a docker-registry 2.8 process on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from registry_fixtures import (
    LAYER_ZSTD,
    MANIFEST_ACCEPT,
    OCI_INDEX,
    FaultProxy,
    RecordingServer,
    Registry,
    RegistryStartError,
    TokenServer,
    busybox_layout,
    issue_cert,
    layout_digest,
    layout_doc,
    make_ca,
    multiarch_layout,
    sha256_digest,
    ssl_context,
    start_registry,
)


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    """curl, never through a proxy; prints the status code last (after a newline)."""
    return subprocess.run(["curl", "-sS", "--noproxy", "*", "--max-time", "10",
                           "-w", "\n%{http_code}", *args],
                          capture_output=True, text=True, timeout=20)


def status_of(out: subprocess.CompletedProcess[str]) -> int:
    return int(out.stdout.rsplit("\n", 1)[-1])


def client(reg: Registry | FaultProxy | str) -> httpx.Client:
    url = reg if isinstance(reg, str) else reg.url
    ca = reg.ca if isinstance(reg, Registry) else None
    return httpx.Client(base_url=url, verify=ssl_context(ca), trust_env=False, timeout=10)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("layouts")
    return {
        "bb": busybox_layout(d / "bb"),
        "bb-extra": busybox_layout(d / "bb-extra", extra_file=("etc/motd", b"hello\n")),
        "zstd": busybox_layout(d / "zstd", layers=1, compression="zstd"),
        "multi": multiarch_layout(d / "multi"),
    }


@pytest.fixture(scope="module")
def anon(tmp_path_factory: pytest.TempPathFactory,
         layouts: dict[str, Path]) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("anon")) as reg:
        reg.push(layouts["bb"], "library/bb:1")
        yield reg
    assert reg.proc is not None and reg.proc.poll() is not None


def test_layouts_are_deterministic_and_share_base_layers(tmp_path: Path,
                                                         layouts: dict[str, Path]) -> None:
    assert layout_digest(busybox_layout(tmp_path / "again")) == layout_digest(layouts["bb"])
    base = [la["digest"] for la in layout_doc(layouts["bb"])["layers"]]
    extra = [la["digest"] for la in layout_doc(layouts["bb-extra"])["layers"]]
    assert len(base) == 2 and extra[:2] == base and len(extra) == 3
    index = layout_doc(layouts["multi"])
    assert index["mediaType"] == OCI_INDEX
    assert [(m["platform"]["os"], m["platform"]["architecture"]) for m in index["manifests"]] \
        == [("linux", "amd64"), ("linux", "arm64"), ("unknown", "unknown")]


def test_anonymous_push_and_pull(anon: Registry, layouts: dict[str, Path]) -> None:
    digest = layout_digest(layouts["bb"])
    out = curl("-H", f"Accept: {MANIFEST_ACCEPT}", "-D", "-",
               f"{anon.url}/v2/library/bb/manifests/1")
    assert status_of(out) == 200, out
    assert f"docker-content-digest: {digest}" in out.stdout.lower()
    assert anon.manifest_digest("library/bb:1") == digest

    # shared base layers, an index with an attestation entry, zstd layers all push as is
    assert anon.push(layouts["bb-extra"], "library/bb:extra") == layout_digest(layouts["bb-extra"])
    assert anon.push(layouts["multi"], "multi:1") == layout_digest(layouts["multi"])
    assert anon.push(layouts["zstd"], "zstd:1") == layout_digest(layouts["zstd"])
    with client(anon) as c:
        r = c.get("/v2/multi/manifests/1", headers={"Accept": MANIFEST_ACCEPT})
        assert r.headers["content-type"] == OCI_INDEX and len(r.json()["manifests"]) == 3
        r = c.get("/v2/zstd/manifests/1", headers={"Accept": MANIFEST_ACCEPT})
        assert [la["mediaType"] for la in r.json()["layers"]] == [LAYER_ZSTD]

        layer = layout_doc(layouts["bb"])["layers"][0]["digest"]
        r = c.get(f"/v2/library/bb/blobs/{layer}", headers={"Accept-Encoding": "identity"})
        assert r.status_code == 200 and sha256_digest(r.content) == layer
        # blob_path is the file served: corrupting it corrupts what the registry sends
        path = anon.blob_path(layer)
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        try:
            r = c.get(f"/v2/library/bb/blobs/{layer}")
            assert len(r.content) == len(original) and sha256_digest(r.content) != layer
        finally:
            path.write_bytes(original)


def test_v2s2_push_changes_the_manifest_type(anon: Registry, layouts: dict[str, Path]) -> None:
    digest = anon.push(layouts["bb"], "v2s2:1", format="v2s2")
    assert digest != layout_digest(layouts["bb"])
    with client(anon) as c:
        r = c.get("/v2/v2s2/manifests/1", headers={"Accept": MANIFEST_ACCEPT})
        assert r.headers["content-type"] == "application/vnd.docker.distribution.manifest.v2+json"
        assert sha256_digest(r.content) == digest


def test_uncompressed_layers_are_pushed_byte_for_byte(anon: Registry, tmp_path: Path) -> None:
    layout = busybox_layout(tmp_path / "raw", layers=1, compression="none")
    assert anon.push(layout, "raw:1") == layout_digest(layout)
    layer = layout_doc(layout)["layers"][0]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    assert anon.blob_path(layer["digest"]).stat().st_size == layer["size"]


def test_tls_and_htpasswd(tmp_path: Path, layouts: dict[str, Path]) -> None:
    with start_registry(tmp_path / "reg", tls=True, auth="htpasswd") as reg:
        assert reg.url.startswith("https://127.0.0.1:") and reg.ca is not None
        digest = reg.push(layouts["bb"], "secret/bb:1")  # skopeo verifying the CA
        user, password = next(iter(reg.users.items()))
        manifest = f"{reg.url}/v2/secret/bb/manifests/1"

        out = curl("--cacert", str(reg.ca), "-D", "-", manifest)
        assert status_of(out) == 401 and 'www-authenticate: basic realm=' in out.stdout.lower()
        out = curl("--cacert", str(reg.ca), "-u", f"{user}:wrong", manifest)
        assert status_of(out) == 401
        out = curl("--cacert", str(reg.ca), "-u", f"{user}:{password}",
                   "-H", f"Accept: {MANIFEST_ACCEPT}", manifest)
        assert status_of(out) == 200 and sha256_digest(out.stdout.rsplit("\n", 1)[0].encode()) \
            == digest
        out = curl(manifest)  # the system trust store does not know the CA
        assert out.returncode == 60, out
        out = curl("--cacert", str(reg.ca), f"https://localhost:{reg.host.split(':')[1]}/v2/")
        assert status_of(out) == 401  # the certificate names localhost too

        with httpx.Client(verify=ssl_context(reg.ca), trust_env=False) as c:
            r = c.get(manifest, auth=(user, password), headers={"Accept": MANIFEST_ACCEPT})
            assert r.status_code == 200
        with httpx.Client(trust_env=False) as c, pytest.raises(httpx.ConnectError):
            c.get(manifest)


def _challenge(header: str) -> dict[str, str]:
    scheme, _, params = header.partition(" ")
    assert scheme == "Bearer"
    return dict(re.findall(r'(\w+)="([^"]*)"', params))


def test_token_auth(tmp_path: Path, layouts: dict[str, Path]) -> None:
    with start_registry(tmp_path / "reg", auth="token") as reg:
        ts = reg.token_server
        assert ts is not None
        reg.push(layouts["bb"], "team/bb:1")
        assert ts.requests == []  # push's token requests are not left for the tests
        user, password = next(iter(reg.users.items()))
        with client(reg) as c:
            r = c.get("/v2/")
            assert r.status_code == 401
            assert _challenge(r.headers["www-authenticate"]) == {
                "realm": ts.realm, "service": ts.service}
            r = c.get("/v2/team/bb/manifests/1", headers={"Accept": MANIFEST_ACCEPT})
            assert r.status_code == 401
            ch = _challenge(r.headers["www-authenticate"])
            assert ch["scope"] == "repository:team/bb:pull"

            params = {"service": ch["service"], "scope": ch["scope"]}
            tr = c.get(ch["realm"], params=params, auth=(user, password))
            assert tr.status_code == 200
            body = tr.json()
            assert body["token"] == body["access_token"] and body["expires_in"] == 60
            claims = jwt.decode(body["token"], options={"verify_signature": False})
            assert claims["sub"] == user and claims["access"] == [
                {"type": "repository", "name": "team/bb", "actions": ["pull"]}]
            assert len(ts.requests) == 1 and ts.requests[0][1] is not None
            assert ts.requests[0][1].startswith("Basic ")

            r = c.get("/v2/team/bb/manifests/1", headers={
                "Accept": MANIFEST_ACCEPT, "Authorization": f"Bearer {body['token']}"})
            assert r.status_code == 200
            assert sha256_digest(r.content) == layout_digest(layouts["bb"])

            assert c.get(ch["realm"], params=params, auth=(user, "wrong")).status_code == 401
            assert c.get(ch["realm"], params=params, auth=("nobody", "x")).status_code == 401
            anon_token = c.get(ch["realm"], params=params).json()["token"]  # no access
            r = c.get("/v2/team/bb/manifests/1", headers={"Authorization": f"Bearer {anon_token}"})
            assert r.status_code == 401
            path, auth = ts.requests[-1]
            assert path.startswith("/token?") and "scope=repository" in path and auth is None
            # a token signed by a key the registry does not trust is refused
            rogue_ca = make_ca("rogue")
            rogue = issue_cert(rogue_ca, "rogue signer", server=False,
                               key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
            good = jwt.decode(body["token"], options={"verify_signature": False})
            header = jwt.get_unverified_header(body["token"])
            assert header["alg"] == "RS256" and len(header["x5c"]) == 1
            x5c = base64.b64encode(rogue.cert.public_bytes(serialization.Encoding.DER)).decode()
            forged = jwt.encode(good, rogue.key, algorithm="RS256", headers={"x5c": [x5c]})
            r = c.get("/v2/team/bb/manifests/1", headers={
                "Accept": MANIFEST_ACCEPT, "Authorization": f"Bearer {forged}"})
            assert r.status_code == 401

        # OAuth2 POST form, anonymous pull, and a shorter lifetime on a server of one's own
        with TokenServer({"carol": "pw"}, anonymous_pull=True, expires_in=5) as ts2, \
                httpx.Client(trust_env=False) as c:
            r = c.get(ts2.realm, params={"scope": "repository:x/y:pull,push"})
            claims = jwt.decode(r.json()["token"], options={"verify_signature": False})
            assert claims["access"] == [{"type": "repository", "name": "x/y",
                                         "actions": ["pull"]}]
            assert r.json()["expires_in"] == 5 and claims["exp"] - claims["iat"] == 5
            r = c.post(ts2.realm, data={"grant_type": "password", "username": "carol",
                                        "password": "pw", "service": ts2.service,
                                        "scope": "repository:x/y:pull,push"})
            claims = jwt.decode(r.json()["access_token"], options={"verify_signature": False})
            assert claims["access"][0]["actions"] == ["pull", "push"]


def test_redirect_to_recording_server(tmp_path: Path, layouts: dict[str, Path]) -> None:
    with RecordingServer() as rec, \
            start_registry(tmp_path / "reg", redirect_to=rec.url) as reg:
        assert rec.host.startswith("127.0.0.2:")
        rec.serve_registry(reg)
        reg.push(layouts["bb"], "bb:1")
        layer = layout_doc(layouts["bb"])["layers"][0]["digest"]
        with client(reg) as c:
            r = c.get(f"/v2/bb/blobs/{layer}")
            assert r.status_code == 307
            assert r.headers["location"].startswith(f"{rec.url}/docker/registry/v2/blobs/")
            r = c.get(f"/v2/bb/blobs/{layer}", follow_redirects=True,
                      headers={"Authorization": "Bearer secret", "Range": "bytes=100-"})
            assert r.status_code == 206 and r.url.host == "127.0.0.2"
            assert len(r.content) == reg.blob_path(layer).stat().st_size - 100
        method, path, headers = rec.requests[-1]
        assert method == "GET" and layer.split(":")[1] in path
        assert "authorization" not in headers and headers["range"] == "bytes=100-"


def test_fault_proxy(anon: Registry, layouts: dict[str, Path]) -> None:
    layer = layout_doc(layouts["bb"])["layers"][0]["digest"]
    size = anon.blob_path(layer).stat().st_size
    blob = f"/v2/library/bb/blobs/{layer}"
    with FaultProxy(anon) as proxy, client(proxy) as c:
        assert proxy.host.startswith("127.0.0.1:") and proxy.host != anon.host
        r = c.head("/v2/library/bb/manifests/1", headers={"Accept": MANIFEST_ACCEPT})
        assert r.headers["docker-content-digest"] == layout_digest(layouts["bb"])
        assert int(r.headers["content-length"]) > 0

        proxy.cut_blob(layer, after=1000)
        got = bytearray()
        with pytest.raises(httpx.RemoteProtocolError), c.stream("GET", blob) as r:
            assert r.status_code == 200 and r.headers["content-length"] == str(size)
            for chunk in r.iter_raw():
                got += chunk
        assert len(got) == 1000
        assert hashlib.sha256(c.get(blob).content).hexdigest() == layer.split(":")[1]  # once

        r = c.get(blob, headers={"Range": "bytes=1000-"})
        assert r.status_code == 206 and len(got + r.content) == size
        assert proxy.requests[-1][2]["range"] == "bytes=1000-"
        proxy.ignore_range(layer)
        r = c.get(blob, headers={"Range": "bytes=1000-"})
        assert r.status_code == 200 and len(r.content) == size

        proxy.throttle("/manifests/", retry_after="2")
        r = c.get("/v2/library/bb/manifests/1", headers={"Accept": MANIFEST_ACCEPT})
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        assert c.get("/v2/library/bb/manifests/1",
                     headers={"Accept": MANIFEST_ACCEPT}).status_code == 200

        proxy.fail("/blobs/", status=503, times=2)
        assert [c.get(blob).status_code for _ in range(3)] == [503, 503, 200]
        assert [m for m, _, _ in proxy.requests].count("HEAD") == 1


def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    bad_tls = {"http": {"tls": {"certificate": str(tmp_path / "missing.pem"),
                                "key": str(tmp_path / "missing.key")}}}
    with pytest.raises(RegistryStartError, match="missing.pem"):
        start_registry(tmp_path / "reg", config=bad_tls)
