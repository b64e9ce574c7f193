"""Pulling from a real registry (docker-registry 2.8 on 127.0.0.1): formats, platforms,
auth, faults, and what the store looks like afterwards.

Pulls run through ``ember.images.registry.pull`` into a store of each test's own;
the daemon's route and ``ember run REF`` are tried at the end. No traffic leaves
127.0.0.0/8.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_fixtures import (
    FaultProxy,
    RecordingServer,
    Registry,
    busybox_layout,
    layout_doc,
    multiarch_layout,
    start_registry,
)

from ember.errors import (
    ImageError,
    NoMatchingPlatform,
    RegistryAuthError,
    RegistryError,
    RegistryNotFound,
)
from ember.images import ImageStore
from ember.images.registry.config import login
from ember.images.registry.pull import pull


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("layouts")
    return {
        "base": busybox_layout(tmp / "base", layers=2),
        "app": busybox_layout(tmp / "app", layers=2, extra_file=("/app/extra.txt", b"extra\n")),
        "zstd": busybox_layout(tmp / "zstd", layers=2, compression="zstd"),
        "multi": multiarch_layout(tmp / "multi", attestation=True),
    }


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory,
             layouts: dict[str, Path]) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("reg")) as reg:
        reg.push(layouts["base"], "bb:oci")
        reg.push(layouts["base"], "bb:v2s2", format="v2s2")
        reg.push(layouts["app"], "app:1")
        reg.push(layouts["zstd"], "zs:1")
        reg.push(layouts["multi"], "multi:1")
        yield reg


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    """An environment that reads no real credentials or registries.conf."""
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    conf = tmp / "registries.conf"
    if not conf.exists():
        conf.write_text("")
    return {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "XDG_CONFIG_HOME": str(home / ".config"), "CONTAINERS_REGISTRIES_CONF": str(conf),
            **extra}


def config_id(layout: Path, platform: str = "amd64") -> str:
    doc = layout_doc(layout)
    if "manifests" in doc:  # an index: the entry of that architecture
        entry = next(m for m in doc["manifests"]
                     if (m.get("platform") or {}).get("architecture") == platform)
        doc = layout_doc(layout, entry["digest"])
    return str(doc["config"]["digest"])


def store_files(store: ImageStore) -> set[str]:
    return {str(p.relative_to(store.root)) for p in store.root.rglob("*")
            if p.is_file() and p.name != "lock" and "downloads" not in p.parts}


def test_anonymous_pull_of_oci_and_schema2_gives_the_image(tmp_path: Path, registry: Registry,
                                                           layouts: dict[str, Path]) -> None:
    store = ImageStore(tmp_path / "store")
    env = env_for(tmp_path)
    got = pull(store, f"{registry.host}/bb:oci", env=env, ember_auth=tmp_path / "auth.json")
    image = got.imported.image
    assert image.id == config_id(layouts["base"])
    assert image.tags == (f"{registry.host}/bb:oci",)
    assert image.pulled_as == f"{registry.host}/bb:oci"
    assert image.repo_digests == (f"{registry.host}/bb@{registry.manifest_digest('bb:oci')}",)
    assert store.rootfs_path(image).is_file() and got.fetched == 2
    # the same image as schema 2 (other manifest, same config): nothing downloaded
    again = pull(store, f"{registry.host}/bb:v2s2", env=env, ember_auth=tmp_path / "auth.json")
    assert again.imported.image.id == image.id and again.fetched == 0
    assert not again.imported.new
    # by digest, and found again by it in the store
    digest = registry.manifest_digest("bb:oci")
    by_digest = pull(store, f"{registry.host}/bb@{digest}", env=env)
    assert by_digest.imported.image.id == image.id
    assert store.resolve(f"{registry.host}/bb@{digest}").id == image.id


def test_layers_shared_with_an_image_in_the_store_are_not_fetched(
        tmp_path: Path, registry: Registry, layouts: dict[str, Path]) -> None:
    store = ImageStore(tmp_path / "store")
    env = env_for(tmp_path)
    pull(store, f"{registry.host}/bb:oci", env=env)
    got = pull(store, f"{registry.host}/app:1", env=env)
    assert got.imported.image.id == config_id(layouts["app"])
    assert got.fetched == 1  # only the layer on top of the shared base


def test_zstd_layers_and_platform_choice(tmp_path: Path, registry: Registry,
                                         layouts: dict[str, Path]) -> None:
    store = ImageStore(tmp_path / "store")
    env = env_for(tmp_path)
    zs = pull(store, f"{registry.host}/zs:1", env=env).imported.image
    assert "zstd" in zs.layers[0].media_type and store.rootfs_path(zs).is_file()
    amd = pull(store, f"{registry.host}/multi:1", env=env).imported.image
    assert amd.id == config_id(layouts["multi"], "amd64")
    # the arm64 entry is chosen, and refused: this Ember runs linux/amd64 guests
    with pytest.raises(ImageError, match="image is for linux/arm64"):
        pull(store, f"{registry.host}/multi:1", platform="linux/arm64", env=env)
    with pytest.raises(NoMatchingPlatform, match=r"linux/s390x.*linux/amd64.*linux/arm64"):
        pull(store, f"{registry.host}/multi:1", platform="linux/s390x", env=env)


def test_unknown_image_and_unreachable_registry_are_one_line(tmp_path: Path,
                                                             registry: Registry) -> None:
    store = ImageStore(tmp_path / "store")
    env = env_for(tmp_path)
    with pytest.raises(RegistryNotFound, match="not found"):
        pull(store, f"{registry.host}/bb:nope", env=env)
    with pytest.raises(RegistryNotFound):
        pull(store, f"{registry.host}/nosuch:1", env=env)
    with pytest.raises(RegistryError, match="cannot reach registry 127.0.0.1:1"):
        pull(store, "127.0.0.1:1/bb:oci", env=env)
    assert store_files(store) <= {"refs.json"}


def test_a_corrupted_blob_fails_and_leaves_the_store_as_it_was(
        tmp_path: Path, layouts: dict[str, Path]) -> None:
    with start_registry(tmp_path / "reg") as reg:
        reg.push(layouts["app"], "app:1")
        top = layout_doc(layouts["app"])
        blob = reg.blob_path(top["layers"][-1]["digest"])
        os.chmod(blob, stat.S_IRUSR | stat.S_IWUSR)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        store = ImageStore(tmp_path / "store")
        env = env_for(tmp_path)
        with pytest.raises(RegistryError, match="does not match its digest"):
            pull(store, f"{reg.host}/app:1", env=env)
        assert store.list() == []
        assert not any((store.root / "blobs" / "sha256").glob("*"))
        assert not any(store.rootfs_dir.glob("*"))


def test_htpasswd_over_tls_with_credentials_from_login(tmp_path: Path,
                                                       layouts: dict[str, Path]) -> None:
    with start_registry(tmp_path / "reg", tls=True, auth="htpasswd") as reg:
        reg.push(layouts["base"], "bb:1")
        user, password = next(iter(reg.users.items()))
        store = ImageStore(tmp_path / "store")
        env = env_for(tmp_path)
        auth = tmp_path / "auth.json"
        with pytest.raises(RegistryError, match="TLS failure"):
            pull(store, f"{reg.host}/bb:1", env=env, ember_auth=auth)
        with pytest.raises(RegistryAuthError, match="ember login"):
            pull(store, f"{reg.host}/bb:1", env=env, ember_auth=auth, ca_cert=reg.ca)
        login(reg.host, user, "wrong", path=auth)
        with pytest.raises(RegistryAuthError, match="refused the credentials"):
            pull(store, f"{reg.host}/bb:1", env=env, ember_auth=auth, ca_cert=reg.ca)
        login(reg.host, user, password, path=auth)
        assert stat.S_IMODE(auth.stat().st_mode) == 0o600
        got = pull(store, f"{reg.host}/bb:1", env=env, ember_auth=auth, ca_cert=reg.ca)
        assert got.imported.image.id == config_id(layouts["base"])


def test_bearer_tokens_from_docker_config_and_a_credential_helper(
        tmp_path: Path, layouts: dict[str, Path]) -> None:
    with start_registry(tmp_path / "reg", auth="token") as reg:
        reg.push(layouts["base"], "bb:1")
        reg.push(layouts["app"], "app:1")
        user, password = next(iter(reg.users.items()))
        assert reg.token_server is not None
        store = ImageStore(tmp_path / "store")
        docker = tmp_path / "docker"
        docker.mkdir()
        import base64
        (docker / "config.json").write_text(json.dumps({"auths": {reg.host: {
            "auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
        env = env_for(tmp_path, DOCKER_CONFIG=str(docker))
        before = len(reg.token_server.requests)
        got = pull(store, f"{reg.host}/bb:1", env=env, ember_auth=tmp_path / "none.json")
        assert got.imported.image.id == config_id(layouts["base"])
        asked = reg.token_server.requests[before:]
        # one token for the repository, reused for the manifest and every blob
        assert len(asked) == 1 and "scope=repository%3Abb%3Apull" in asked[0][0]
        assert asked[0][1] is not None and asked[0][1].startswith("Basic ")
        # a credential helper instead (docker's protocol), with a bad password: refused
        helper = tmp_path / "bin" / "docker-credential-test"
        helper.parent.mkdir()
        helper.write_text("#!/bin/sh\ncat >/dev/null\n"
                          f"echo '{{\"Username\": \"{user}\", \"Secret\": \"bad\"}}'\n")
        helper.chmod(0o755)
        (docker / "config.json").write_text(json.dumps({"credHelpers": {reg.host: "test"}}))
        env["PATH"] = f"{helper.parent}:{env['PATH']}"
        with pytest.raises(RegistryAuthError, match="refused the credentials"):
            pull(store, f"{reg.host}/app:1", env=env, ember_auth=tmp_path / "none.json")
        helper.write_text(helper.read_text().replace('"bad"', f'"{password}"'))
        got = pull(store, f"{reg.host}/app:1", env=env, ember_auth=tmp_path / "none.json")
        assert got.imported.image.id == config_id(layouts["app"])


def test_a_cut_download_resumes_and_429_is_retried(tmp_path: Path, registry: Registry,
                                                   layouts: dict[str, Path]) -> None:
    top = layout_doc(layouts["zstd"])
    big = max(top["layers"], key=lambda x: x["size"])
    with FaultProxy(registry) as proxy:
        proxy.cut_blob(big["digest"], after=big["size"] // 3)
        proxy.throttle("/manifests/", retry_after="1")
        store = ImageStore(tmp_path / "store")
        got = pull(store, f"{proxy.host}/zs:1", env=env_for(tmp_path))
        assert got.imported.image.id == config_id(layouts["zstd"])
        ranges = [h.get("range") for m, p, h in proxy.requests if big["digest"] in p]
        assert ranges[0] is None and ranges[-1] == f"bytes={big['size'] // 3}-"
        manifests = [p for m, p, h in proxy.requests if "/manifests/" in p]
        assert len(manifests) >= 2  # the throttled one, then again


def test_a_redirect_to_another_host_gets_no_credentials(tmp_path: Path,
                                                        layouts: dict[str, Path]) -> None:
    with RecordingServer() as rec, \
            start_registry(tmp_path / "reg", auth="htpasswd", redirect_to=rec.url) as reg:
        rec.serve_registry(reg)
        reg.push(layouts["base"], "bb:1")
        user, password = next(iter(reg.users.items()))
        auth = tmp_path / "auth.json"
        login(reg.host, user, password, path=auth)
        store = ImageStore(tmp_path / "store")
        got = pull(store, f"{reg.host}/bb:1", env=env_for(tmp_path), ember_auth=auth)
        assert got.imported.image.id == config_id(layouts["base"])
        blobs = [h for m, p, h in rec.requests if m == "GET"]
        assert blobs and all("authorization" not in h for h in blobs)


def test_the_daemon_pulls_and_streams_progress(daemon: object, registry: Registry) -> None:
    from ember.sdk import Client, NotFound

    events: list[str] = []
    with Client(autostart=False) as c:
        image = c.images.pull(f"{registry.host}/app:1",
                              progress=lambda ev: events.append(ev.status))
        assert f"{registry.host}/app:1" in image.tags and image.repo_digests
        assert events[0] == "resolved" and "layer" in events
        assert c.images.get(f"{registry.host}/app:1").id == image.id
        with pytest.raises(NotFound, match="not found"):
            c.images.pull(f"{registry.host}/app:nope")


def test_ember_run_pulls_an_image_on_first_use(ember_home: Path, guest: object,
                                               registry: Registry,
                                               layouts: dict[str, Path]) -> None:
    import subprocess
    import sys

    registry.push(layouts["app"], "first-use:1")  # a name no other test pulls
    ref = f"{registry.host}/first-use:1"
    cmd = [sys.executable, "-m", "ember.cli", "run", ref, "--", "cat", "/app/extra.txt"]
    never = subprocess.run([*cmd[:4], "--pull", "never", *cmd[4:]], capture_output=True,
                           timeout=120)
    assert never.returncode == 125 and b"not found" in never.stderr
    first = subprocess.run(cmd, capture_output=True, timeout=300)
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout == b"extra\n" and b"pulling " + ref.encode() in first.stderr
    second = subprocess.run(cmd, capture_output=True, timeout=300)
    assert second.returncode == 0 and second.stdout == b"extra\n"
    assert b"pulling" not in second.stderr  # in the store now


def test_registries_conf_mirrors_are_tried_first_and_blocked_refused(
        tmp_path: Path, registry: Registry, layouts: dict[str, Path]) -> None:
    # ember-mirror.test never resolves: its location is a dead port, its mirror the registry
    conf = tmp_path / "registries.conf"
    conf.write_text(f'''
[[registry]]
prefix = "ember-mirror.test"
location = "127.0.0.1:1"
[[registry.mirror]]
location = "{registry.host}"

[[registry]]
prefix = "ember-fallback.test"
location = "{registry.host}"
[[registry.mirror]]
location = "127.0.0.1:1"

[[registry]]
prefix = "ember-blocked.test"
blocked = true
''')
    env = env_for(tmp_path)
    store = ImageStore(tmp_path / "store")
    got = pull(store, "ember-mirror.test/bb:oci", env=env)
    assert got.source == registry.host and got.imported.image.id == config_id(layouts["base"])
    assert got.imported.image.tags == ("ember-mirror.test/bb:oci",)
    events: list[dict[str, object]] = []
    got = pull(store, "ember-fallback.test/app:1", env=env, on_event=events.append)
    assert got.source == registry.host
    assert any("mirror 127.0.0.1:1 failed" in str(e.get("message")) for e in events)
    with pytest.raises(RegistryError, match="blocked by registries.conf"):
        pull(store, "ember-blocked.test/bb:oci", env=env)


def test_the_daemon_trusts_a_ca_given_with_the_pull(daemon: object, tmp_path: Path,
                                                    layouts: dict[str, Path]) -> None:
    from ember.sdk import APIError, Client

    with start_registry(tmp_path / "reg", tls=True) as reg, Client(autostart=False) as c:
        reg.push(layouts["base"], "tls:1")
        with pytest.raises(APIError, match="TLS failure") as info:
            c.images.pull(f"{reg.host}/tls:1")
        assert info.value.status == 424
        assert reg.ca is not None
        image = c.images.pull(f"{reg.host}/tls:1", ca_cert=reg.ca)
        assert image.id == config_id(layouts["base"])
