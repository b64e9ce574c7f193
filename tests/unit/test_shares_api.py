"""Host shares through the daemon: machine creates with ``shares``, the CLI's ``-v HOSTDIR``,
the SDK's ``shares=`` (and host directories in ``volumes=``).

A real Manager over a temporary data dir; no machine is booted. The shared directories are
tmp_path's.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import err, sample_manager
from fastapi.testclient import TestClient

from ember.api import models
from ember.api.app import create_app
from ember.cli import _parser
from ember.cli.machine import create_machine, share_specs, volume_specs
from ember.daemon.manager import Manager
from ember.sdk import AsyncClient, Client, InvalidRequest
from ember.sdk._common import machine_create_body
from ember.volumes.shares import ShareMount
from ember.volumes.store import MIN_SIZE, VolumeRequest


@pytest.fixture(scope="module")
def mgr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manager]:
    with sample_manager(tmp_path_factory) as m:
        yield m


@pytest.fixture(scope="module")
def client(mgr: Manager) -> Iterator[TestClient]:
    with TestClient(create_app(mgr), raise_server_exceptions=False) as c:
        yield c


def create(client: TestClient, shares: Any, **extra: Any) -> httpx.Response:
    body = {"image": "sample:latest", "shares": shares} | extra
    return client.post("/v1/machines", json=body)


# ------------------------------------------------------------- the API


def test_a_create_with_shares_stores_them_and_the_machine_shows_them(
        client: TestClient, mgr: Manager, tmp_path: Path) -> None:
    app = tmp_path / "app"
    cfg = tmp_path / "cfg"
    app.mkdir()
    cfg.mkdir()
    (tmp_path / "link").symlink_to(app)
    r = create(client, [{"source": str(tmp_path / "link"), "target": "/srv/app/"},
                        {"source": f"{cfg}/", "target": "/etc/app", "readonly": True}],
               name="withshare")
    assert r.status_code == 201, r.text
    want = [{"source": str(app), "target": "/srv/app", "readonly": False},
            {"source": str(cfg), "target": "/etc/app", "readonly": True}]
    assert r.json()["shares"] == want and r.json()["volumes"] == []
    assert client.get("/v1/machines/withshare").json()["shares"] == want
    assert [m["shares"] for m in client.get("/v1/machines").json()
            if m["name"] == "withshare"] == [want]
    mm = mgr.get("withshare")
    assert mm.doc["shares"] == want
    config = mgr.machine_config(mm.doc, [])
    assert config.shares == (ShareMount(app, "/srv/app"), ShareMount(cfg, "/etc/app", True))
    assert config.mounts_host_data and config.volumes == ()

    plain = client.post("/v1/machines", json={"image": "sample:latest", "name": "noshare"})
    assert plain.status_code == 201 and plain.json()["shares"] == []
    assert mgr.machine_config(mgr.get("noshare").doc, []).shares == ()
    # a record from before shares: none
    old = {k: v for k, v in mgr.get("noshare").doc.items() if k != "shares"}
    assert mgr.machine_config(old, []).shares == ()
    assert models.Machine.model_validate(
        {k: v for k, v in mgr.get("noshare").public().items() if k != "shares"}).shares == []


@pytest.mark.parametrize("source", ["srv/app", "./app", "~/app", "", "/"])
def test_a_source_that_is_not_an_absolute_directory_is_422(client: TestClient,
                                                          source: str) -> None:
    err(create(client, [{"source": source, "target": "/app"}]), 422, "invalid")


def test_a_missing_directory_or_a_file_is_422(client: TestClient, tmp_path: Path) -> None:
    msg = err(create(client, [{"source": str(tmp_path / "missing"), "target": "/app"}]),
              422, "invalid")
    assert "does not exist" in msg
    (tmp_path / "file").write_text("x")
    msg = err(create(client, [{"source": str(tmp_path / "file"), "target": "/app"}]),
              422, "invalid")
    assert "not a directory" in msg


def test_the_data_dir_cannot_be_shared(client: TestClient, mgr: Manager) -> None:
    for source in (mgr.home, mgr.home / "machines", mgr.home.parent):
        source.mkdir(exist_ok=True)
        msg = err(create(client, [{"source": str(source), "target": "/x"}]), 422, "invalid")
        assert "data directory" in msg


def test_shares_with_a_snapshot_are_422(client: TestClient, tmp_path: Path) -> None:
    r = client.post("/v1/machines", json={"snapshot": "whatever", "shares": [
        {"source": str(tmp_path), "target": "/d"}]})
    assert "snapshot" in err(r, 422, "invalid")


def test_nested_or_repeated_targets_are_422(client: TestClient, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    msg = err(create(client, [{"source": str(a), "target": "/data"},
                              {"source": str(b), "target": "/data/sub"}]), 422, "invalid")
    assert "nest" in msg
    msg = err(create(client, [{"source": str(a), "target": "/data"},
                              {"source": str(b), "target": "/data/"}]), 422, "invalid")
    assert "twice" in msg
    # the same directory at two paths is fine
    r = create(client, [{"source": str(a), "target": "/one"},
                        {"source": str(a), "target": "/two", "readonly": True}])
    assert r.status_code == 201, r.text


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="no mkfs.ext4")
def test_volumes_and_shares_are_checked_together(client: TestClient, mgr: Manager,
                                                tmp_path: Path) -> None:
    assert client.post("/v1/volumes", json={"name": "shv", "size_bytes": MIN_SIZE}
                       ).status_code == 201
    vols = [{"name": "shv", "target": "/data"}]
    msg = err(create(client, [{"source": str(tmp_path), "target": "/data/src"}],
                     volumes=vols), 422, "invalid")
    assert "nest" in msg
    msg = err(create(client, [{"source": str(tmp_path), "target": "/data"}], volumes=vols),
              422, "invalid")
    assert "twice" in msg
    r = create(client, [{"source": str(tmp_path), "target": "/src"}], volumes=vols,
               name="both")
    assert r.status_code == 201, r.text
    assert r.json()["volumes"] == [{"name": "shv", "target": "/data", "readonly": False}]
    assert r.json()["shares"] == [{"source": str(tmp_path), "target": "/src",
                                   "readonly": False}]
    config = mgr.machine_config(mgr.get("both").doc, [])
    assert [v.name for v in config.volumes] == ["shv"]
    assert config.shares == (ShareMount(tmp_path, "/src"),)
    # 16 volumes now: 17 is refused by the contract
    err(client.post("/v1/machines", json={"image": "sample:latest", "volumes": [
        {"name": f"v{i}", "target": f"/m{i}"} for i in range(17)]}), 422, "invalid")


def test_malformed_shares_are_422(client: TestClient, tmp_path: Path) -> None:
    src = str(tmp_path)
    err(create(client, [{"source": src, "target": "/"}]), 422, "invalid")
    err(create(client, [{"source": src, "target": "relative"}]), 422, "invalid")
    err(create(client, [{"source": src, "target": "/a b"}]), 422, "invalid")
    err(create(client, [{"source": src, "target": "/d", "mode": "ro"}]), 422, "invalid")
    err(create(client, [{"source": src, "target": "/d", "readonly": "yes"}]), 422, "invalid")
    err(create(client, [{"target": "/d"}]), 422, "invalid")
    err(create(client, [{"source": src, "target": f"/m{i}"} for i in range(33)]),
        422, "invalid")


def test_the_openapi_document_has_shares(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["MachineCreate"]["properties"]["shares"]["maxItems"] == 32
    assert schemas["MachineCreate"]["properties"]["volumes"]["maxItems"] == 16
    assert "shares" in schemas["Machine"]["properties"]
    assert set(schemas["ShareSpec"]["properties"]) == {"source", "target", "readonly"}


# ------------------------------------------------------------- the CLI


@pytest.mark.parametrize("command", ["run", "create"])
def test_v_splits_into_volumes_and_shares(command: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rel").mkdir()
    (tmp_path / "abs").mkdir()
    monkeypatch.chdir(tmp_path)
    args = _parser(command).parse_args(
        [command, "-v", "data:/data", "-v", "./rel:/src:ro", "--volume",
         f"{tmp_path}/abs:/abs", "-v", "logs:/var/log:ro", "sample:latest"])
    assert args.volume == [VolumeRequest("data", "/data"),
                           ShareMount(tmp_path / "rel", "/src", True),
                           ShareMount(tmp_path / "abs", "/abs"),
                           VolumeRequest("logs", "/var/log", True)]
    assert volume_specs(args) == [{"name": "data", "target": "/data", "readonly": False},
                                  {"name": "logs", "target": "/var/log", "readonly": True}]
    assert share_specs(args) == [
        {"source": str(tmp_path / "rel"), "target": "/src", "readonly": True},
        {"source": str(tmp_path / "abs"), "target": "/abs", "readonly": False}]
    plain = _parser(command).parse_args([command, "sample:latest"])
    assert volume_specs(plain) == [] and share_specs(plain) == []


def test_v_help_names_volumes_and_shares(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("run", "create"):
        with pytest.raises(SystemExit):
            _parser(command).parse_args([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "NAME:/PATH[:ro] mounts a named volume" in out
        assert "HOSTDIR:/PATH[:ro] shares a host directory" in out


def test_ember_create_sends_the_shares(client: TestClient, mgr: Manager, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path)
    args = _parser("create").parse_args(
        ["create", "--name", "clishare", "-v", "work:/w:ro", "sample:latest"])
    assert share_specs(args) == []  # "work" is a volume's name, not ./work
    args = _parser("create").parse_args(
        ["create", "--name", "clishare", "-v", "./work:/w:ro", "sample:latest"])
    with Client(base_url="http://testserver", transport=client._transport) as c:
        m = create_machine(c, args, start=False)
    assert [s.model_dump() for s in m.info.shares] == [
        {"source": str(tmp_path / "work"), "target": "/w", "readonly": True}]
    assert m.info.volumes == []
    assert mgr.get("clishare").doc["shares"] == [
        {"source": str(tmp_path / "work"), "target": "/w", "readonly": True}]


def test_a_run_with_a_share_has_no_plan(tmp_path: Path) -> None:
    from ember.cli import run as cli_run

    args = _parser("run").parse_args(["run", "-v", f"{tmp_path}:/data", "sample:latest"])
    assert cli_run._speculate(args) == (None, None)


# ------------------------------------------------------------- the SDK


def body(**kwargs: Any) -> dict[str, Any]:
    given: dict[str, Any] = dict(name=None, cpus=None, memory_mib=None, env=None, cmd=None,
                                 entrypoint=None, workdir=None, user=None, hostname=None,
                                 ports=None, network=None, restart="no")
    return machine_create_body("sample:latest", **(given | kwargs))


def test_sdk_body_takes_shares_in_both_forms(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/someone")
    got = body(shares=["/srv/app:/app", "/srv/cfg/:/etc/cfg/:ro", "./rel:/rel:rw",
                       "~/x:/x",
                       {"source": "/opt/data", "target": "/opt/data"},
                       {"source": "/opt/ro", "target": "/ro", "readonly": True},
                       models.ShareSpec(source="/m", target="/model")])
    assert got["shares"] == [
        {"source": "/srv/app", "target": "/app", "readonly": False},
        {"source": "/srv/cfg", "target": "/etc/cfg", "readonly": True},
        {"source": str(tmp_path / "rel"), "target": "/rel", "readonly": False},
        {"source": "/home/someone/x", "target": "/x", "readonly": False},
        {"source": "/opt/data", "target": "/opt/data", "readonly": False},
        {"source": "/opt/ro", "target": "/ro", "readonly": True},
        {"source": "/m", "target": "/model", "readonly": False}]
    # the directories are the daemon host's: none is looked for here (/srv/app need not be)
    assert "volumes" not in got


def test_sdk_volumes_take_host_directories_as_shares(tmp_path: Path) -> None:
    got = body(volumes=["data:/data", "/srv/app:/app:ro",
                        {"name": "logs", "target": "/logs", "readonly": True},
                        {"source": "/srv/cfg", "target": "/cfg"},
                        models.ShareSpec(source="/srv/m", target="/m")],
               shares=[f"{tmp_path}:/t"])
    assert got["volumes"] == [{"name": "data", "target": "/data", "readonly": False},
                              {"name": "logs", "target": "/logs", "readonly": True}]
    assert got["shares"] == [{"source": "/srv/app", "target": "/app", "readonly": True},
                             {"source": "/srv/cfg", "target": "/cfg", "readonly": False},
                             {"source": "/srv/m", "target": "/m", "readonly": False},
                             {"source": str(tmp_path), "target": "/t", "readonly": False}]
    assert "shares" not in body(volumes=["data:/data"])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"shares": "/srv:/srv"}, "shares must be a list"),
    ({"shares": {"source": "/srv", "target": "/srv"}}, "shares must be a list"),
    ({"shares": ["data:/data"]}, "volume's name"),
    ({"shares": ["/srv"]}, "HOSTDIR:/PATH"),
    ({"shares": ["/srv:/d:rx"]}, "mode"),
    ({"shares": ["/srv:/"]}, "target"),
    ({"shares": ["/srv:/a b"]}, "mount path"),
    ({"shares": [{"source": "srv", "target": "/d"}]}, "source"),
    ({"shares": [{"source": "/srv", "target": "/d", "mode": "ro"}]}, "unknown field"),
    ({"shares": [42]}, "a share is"),
    ({"shares": ["/a:/d", "/b:/d/e"]}, "nest"),
    ({"shares": ["/a:/d"], "volumes": ["data:/d"]}, "twice"),
    ({"volumes": ["/a:/d", "/b:/d"]}, "twice"),
    ({"shares": [f"/s{i}:/m{i}" for i in range(33)]}, "shares"),
])
def test_sdk_refuses_malformed_shares_before_sending(kwargs: dict[str, Any],
                                                     match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        body(**kwargs)


def test_sdk_refuses_shares_with_a_snapshot() -> None:
    with pytest.raises(InvalidRequest, match="snapshot"):
        machine_create_body(None, snapshot="snap", name=None, cpus=None, memory_mib=None,
                            env=None, cmd=None, entrypoint=None, workdir=None, user=None,
                            hostname=None, ports=None, network=None, restart="no",
                            shares=["/srv:/srv"])


def test_sdk_shares_end_to_end(client: TestClient, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with Client(base_url="http://testserver", transport=client._transport) as c:
        m = c.machines.create("sample:latest", name="sdkshare", start=False,
                              shares=[f"{tmp_path}/a:/a:ro"],
                              volumes=[f"{tmp_path}:/t"])
        assert [s.model_dump() for s in m.info.shares] == [
            {"source": str(tmp_path), "target": "/t", "readonly": False},
            {"source": str(tmp_path / "a"), "target": "/a", "readonly": True}]
        assert c.machines.get("sdkshare").info.shares == m.info.shares
        # missing on the daemon's host: the daemon says so (422)
        with pytest.raises(InvalidRequest, match="does not exist"):
            c.machines.create("sample:latest", start=False,
                              shares=[{"source": str(tmp_path / "nope"), "target": "/n"}])


def test_async_sdk_shares(client: TestClient, tmp_path: Path) -> None:
    async def main() -> list[models.ShareSpec]:
        transport = httpx.ASGITransport(app=client.app)
        async with AsyncClient(base_url="http://testserver", transport=transport) as c:
            m = await c.machines.create("sample:latest", name="asyncshare", start=False,
                                        shares=[{"source": str(tmp_path), "target": "/s",
                                                 "readonly": True}])
            with pytest.raises(InvalidRequest, match="nest"):
                await c.machines.create("sample:latest", start=False,
                                        shares=[f"{tmp_path}:/s", f"{tmp_path}:/s/t"])
            return m.info.shares

    assert [s.model_dump() for s in asyncio.run(main())] == [
        {"source": str(tmp_path), "target": "/s", "readonly": True}]
