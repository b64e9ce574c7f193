"""Named volumes through the daemon: the routes, machine creates naming volumes, the SDK.

A real Manager over a temporary data dir; no machine is booted (mkfs.ext4 runs).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_helpers import err, sample_manager
from fastapi.testclient import TestClient

from ember.api.app import create_app
from ember.daemon.errors import Conflict
from ember.daemon.manager import Manager
from ember.sdk import AsyncClient, Client, InvalidRequest
from ember.sdk import Conflict as SDKConflict
from ember.sdk import NotFound as SDKNotFound
from ember.volumes.store import MIN_SIZE, VolumeRequest, hold

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="no mkfs.ext4")


@pytest.fixture(scope="module")
def mgr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    with sample_manager(tmp_path_factory) as m:
        yield m


@pytest.fixture(scope="module")
def client(mgr: Manager) -> Iterator[TestClient]:
    with TestClient(create_app(mgr), raise_server_exceptions=False) as c:
        yield c




def test_create_list_get_delete(client: TestClient) -> None:
    r = client.post("/v1/volumes", json={"name": "vol1", "size_bytes": 64 << 20})
    assert r.status_code == 201, r.text
    vol = r.json()
    assert vol["name"] == "vol1" and vol["size_bytes"] == 64 << 20
    assert 0 < vol["disk_bytes"] < 64 << 20 and vol["in_use"] is False
    assert vol["path"].endswith("/volumes/vol1/volume.img") and vol["created_at"]
    assert client.get("/v1/volumes/vol1").json() == vol
    assert "vol1" in [v["name"] for v in client.get("/v1/volumes").json()]
    assert client.delete("/v1/volumes/vol1").status_code == 204
    err(client.get("/v1/volumes/vol1"), 404, "not_found")
    err(client.delete("/v1/volumes/vol1"), 404, "not_found")


def test_default_size_is_10_gib(client: TestClient) -> None:
    r = client.post("/v1/volumes", json={"name": "big"})
    assert r.status_code == 201, r.text
    assert r.json()["size_bytes"] == 10 << 30 and r.json()["disk_bytes"] < 1 << 30
    assert client.delete("/v1/volumes/big").status_code == 204


def test_bad_creates(client: TestClient) -> None:
    assert client.post("/v1/volumes", json={"name": "dup", "size_bytes": MIN_SIZE}
                       ).status_code == 201
    assert "exists" in err(client.post("/v1/volumes", json={"name": "dup"}), 409, "conflict")
    err(client.post("/v1/volumes", json={"name": "a/b"}), 422, "invalid")
    err(client.post("/v1/volumes", json={"name": "-a"}), 422, "invalid")
    err(client.post("/v1/volumes", json={"name": "small", "size_bytes": 1 << 20}), 422)
    err(client.post("/v1/volumes", json={"name": "x", "size_bytes": "1G"}), 422)
    err(client.post("/v1/volumes", json={"name": "x", "what": 1}), 422)
    err(client.get("/v1/volumes/..%2Fetc"), 404)


def test_delete_in_use_is_409(client: TestClient, mgr: Manager) -> None:
    client.post("/v1/volumes", json={"name": "held", "size_bytes": MIN_SIZE})
    fd = hold(mgr.volume_store.mount(VolumeRequest("held", "/d")))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             pass_fds=(fd,))
    os.close(fd)
    try:
        assert client.get("/v1/volumes/held").json()["in_use"] is True
        assert "in use" in err(client.delete("/v1/volumes/held"), 409, "conflict")
    finally:
        child.kill()
        child.wait()
    assert client.delete("/v1/volumes/held").status_code == 204


def test_machine_create_records_volumes_and_resolves_them_at_start(
        client: TestClient, mgr: Manager) -> None:
    client.post("/v1/volumes", json={"name": "mdata", "size_bytes": MIN_SIZE})
    client.post("/v1/volumes", json={"name": "mlogs", "size_bytes": MIN_SIZE})
    vols = [{"name": "mdata", "target": "/data"},
            {"name": "mlogs", "target": "/var/log/app/", "readonly": True}]
    r = client.post("/v1/machines", json={"image": "sample:latest", "name": "withvol",
                                          "volumes": vols})
    assert r.status_code == 201, r.text
    want = [{"name": "mdata", "target": "/data", "readonly": False},
            {"name": "mlogs", "target": "/var/log/app", "readonly": True}]
    assert r.json()["volumes"] == want
    assert client.get("/v1/machines/withvol").json()["volumes"] == want
    mm = mgr.get("withvol")
    config = mgr.machine_config(mm.doc, [])
    assert [(v.name, v.target, v.readonly) for v in config.volumes] == [
        ("mdata", "/data", False), ("mlogs", "/var/log/app", True)]
    assert config.volumes[0].path == mgr.volume_store.get("mdata").path
    # a volume removed after the create: the next start is refused (409)
    assert client.delete("/v1/volumes/mlogs").status_code == 204
    with pytest.raises(Conflict, match="mlogs"):
        mgr.machine_config(mm.doc, [])
    plain = client.post("/v1/machines", json={"image": "sample:latest", "name": "novol"})
    assert plain.json()["volumes"] == []
    assert mgr.machine_config(mgr.get("novol").doc, []).volumes == ()


def test_machine_create_refusals(client: TestClient) -> None:
    client.post("/v1/volumes", json={"name": "rdata", "size_bytes": MIN_SIZE})

    def create(vols: Any, **extra: Any) -> Any:
        return client.post("/v1/machines", json={"image": "sample:latest", "volumes": vols,
                                                 **extra})

    assert "nope" in err(create([{"name": "nope", "target": "/d"}]), 404, "not_found")
    assert "twice" in err(create([{"name": "rdata", "target": "/a"},
                                  {"name": "rdata", "target": "/b"}]), 422, "invalid")
    err(create([{"name": "rdata", "target": "/"}]), 422, "invalid")
    err(create([{"name": "rdata", "target": "relative"}]), 422, "invalid")
    err(create([{"name": "rdata", "target": "/a b"}]), 422, "invalid")
    err(create([{"name": "/srv", "target": "/d"}]), 422, "invalid")
    err(create([{"name": "rdata", "target": "/d", "mode": "ro"}]), 422, "invalid")
    err(create([{"name": f"v{i}", "target": f"/m{i}"} for i in range(17)]), 422, "invalid")
    r = client.post("/v1/machines", json={"snapshot": "whatever", "volumes": [
        {"name": "rdata", "target": "/d"}]})
    assert r.status_code in (404, 422), r.text


def test_sdk_volumes_end_to_end(client: TestClient, mgr: Manager) -> None:
    transport: httpx.BaseTransport = client._transport
    with Client(base_url="http://testserver", transport=transport) as c:
        vol = c.volumes.create("sdkvol", size_bytes=32 << 20)
        assert vol.name == "sdkvol" and vol.size_bytes == 32 << 20
        assert c.volumes.get("sdkvol") == vol
        assert "sdkvol" in [v.name for v in c.volumes.list()]
        with pytest.raises(SDKConflict, match="exists"):
            c.volumes.create("sdkvol")
        with pytest.raises(InvalidRequest):
            c.volumes.create("bad/name")
        m = c.machines.create("sample:latest", name="sdkm", start=False,
                              volumes=[{"name": "sdkvol", "target": "/data"}])
        assert [v.model_dump() for v in m.info.volumes] == [
            {"name": "sdkvol", "target": "/data", "readonly": False}]
        m2 = c.machines.create("sample:latest", name="sdkm2", start=False,
                               volumes=["sdkvol:/ro:ro"])
        assert [v.model_dump() for v in m2.info.volumes] == [
            {"name": "sdkvol", "target": "/ro", "readonly": True}]
        with pytest.raises(SDKNotFound):
            c.machines.create("sample:latest", start=False, volumes=["missing:/data"])
        # a host directory is a share (tests/unit/test_shares_api.py), the daemon host's
        with pytest.raises(InvalidRequest, match="does not exist"):
            c.machines.create("sample:latest", start=False,
                              volumes=["/nonexistent-ember-dir:/data"])
        with pytest.raises(InvalidRequest):
            c.machines.create("sample:latest", start=False, volumes="sdkvol:/data")  # type: ignore[arg-type]
        c.volumes.remove("sdkvol")  # not running: removable, as Docker's
        with pytest.raises(SDKNotFound):
            c.volumes.get("sdkvol")
        with pytest.raises(SDKNotFound):
            c.volumes.remove("sdkvol")


def test_async_sdk_volumes(client: TestClient) -> None:
    async def main() -> list[str]:
        transport = httpx.ASGITransport(app=client.app)
        async with AsyncClient(base_url="http://testserver", transport=transport) as c:
            await c.volumes.create("avol", size_bytes=MIN_SIZE)
            assert (await c.volumes.get("avol")).name == "avol"
            names = [v.name for v in await c.volumes.list()]
            await c.volumes.remove("avol")
            with pytest.raises(SDKNotFound):
                await c.volumes.get("avol")
            return names

    assert "avol" in asyncio.run(main())
