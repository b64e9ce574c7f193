"""Images through a real daemon: import, upload, tag, rm and prune over the API, the SDK
(sync and async) and the CLI, and what they mean for the machines using them.

The session daemon's store holds the images other modules boot (``sample:latest``,
``entry:latest``): tests here add their own (tags ``imgt-*``) and prune only what
has no tag; ``prune -a`` runs against a daemon of its own data dir.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

import ember
from ember.sample import DEFAULT_CONFIG, write_busybox_image
from ember.sdk import Conflict, NotFound

if TYPE_CHECKING:
    from conftest import Daemon


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.http() as c:
        yield c


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[ember.Client]:
    with ember.Client(daemon.socket) as c:
        yield c


def layout(tmp: Path, name: str, **config: object) -> Path:
    """A bootable one-layer busybox image; ``config`` makes its id differ from the others'."""
    return write_busybox_image(tmp / name, layers=1, config={**DEFAULT_CONFIG, **config})


def oci_tar(src: Path, dest: Path) -> Path:
    with tarfile.open(dest, "w") as tf:
        for name in sorted(os.listdir(src)):
            tf.add(src / name, arcname=name)
    return dest


def ember_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ember", *args], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env=os.environ.copy())


def test_import_and_upload_go_through_the_api(api: httpx.Client, client: ember.Client,
                                              daemon: Daemon, tmp_path: Path) -> None:
    first = layout(tmp_path, "first", Labels={"t": "import"})
    r = api.post("/v1/images/import", json={"path": str(first), "tag": "imgt-import:1"})
    assert r.status_code == 201, r.text
    imported = r.json()
    assert imported["tags"] == ["imgt-import:1"] and imported["moved_tags"] == []
    assert imported["labels"] == {"t": "import"} and Path(imported["rootfs"]).is_file()
    assert len(imported["layer_details"]) == imported["layers"] == 1
    got = api.get("/v1/images/imgt-import:1").json()
    assert got["id"] == imported["id"] and got["manifest_digest"] == imported["manifest_digest"]

    # an upload that carries a tag another image has: the tag moves, the answer says so
    second = oci_tar(layout(tmp_path, "second", Labels={"t": "upload"}), tmp_path / "s.tar")
    up = client.images.upload(second, tag="imgt-import:1")
    assert up.tags == ["imgt-import:1"] and up.id != imported["id"]
    assert [(m.tag, m.from_image) for m in up.moved_tags] == [("imgt-import:1",
                                                              imported["id"])]
    assert client.images.get(imported["id"]).tags == []
    # nothing of the upload stays behind on the daemon's host
    assert list(daemon.home.rglob("upload-*")) == []
    # the untagged one goes with prune, the other stays
    pruned = client.images.prune()
    assert imported["id"] in pruned.deleted and up.id not in pruned.deleted
    assert pruned.space_reclaimed > 0
    with pytest.raises(NotFound):
        client.images.get(imported["id"])
    assert client.images.remove("imgt-import:1").deleted == [up.id]


def test_an_upload_survives_other_image_changes_while_it_arrives(
        api: httpx.Client, daemon: Daemon, tmp_path: Path) -> None:
    """Every change to the store sweeps its scratch space: an upload must not live there."""
    archive = oci_tar(layout(tmp_path, "slow", Labels={"t": "slow"}), tmp_path / "slow.tar")
    data = archive.read_bytes()
    go = threading.Event()

    def body() -> Iterator[bytes]:
        yield data[:65536]
        go.wait(60)
        yield data[65536:]

    result: list[httpx.Response] = []

    def upload() -> None:
        with daemon.http() as c:
            result.append(c.post("/v1/images/upload", params={"tag": "imgt-slow:1"},
                                 content=body(), headers={"content-type": "application/x-tar"}))

    t = threading.Thread(target=upload)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while not list(daemon.home.rglob("upload-*")):  # the daemon is receiving it
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.05)
        other = layout(tmp_path, "other", Labels={"t": "other"})
        r = api.post("/v1/images/import", json={"path": str(other), "tag": "imgt-other:1"})
        assert r.status_code == 201, r.text
    finally:
        go.set()
        t.join(120)
    (resp,) = result
    assert resp.status_code == 201, resp.text
    assert resp.json()["tags"] == ["imgt-slow:1"]
    for tag in ("imgt-slow:1", "imgt-other:1"):
        assert api.delete(f"/v1/images/{tag}").status_code == 200


def test_tag_and_rm_over_http(api: httpx.Client, tmp_path: Path) -> None:
    src = layout(tmp_path, "h", Labels={"h": "1"})
    r = api.post("/v1/images/import", json={"path": str(src), "tag": "imgt-http:1"})
    assert r.status_code == 201, r.text
    image_id = r.json()["id"]
    r = api.post("/v1/images/imgt-http:1/tag", json={"tag": "imgt-http:2"})
    assert r.status_code == 201 and r.json()["tags"] == ["imgt-http:1", "imgt-http:2"]
    assert api.post("/v1/images/imgt-http:1/tag", json={"tag": "Not A Tag"}).status_code == 422
    assert api.post("/v1/images/imgt-nope:1/tag", json={"tag": "x:1"}).status_code == 404
    r = api.delete(f"/v1/images/{image_id}")
    assert r.status_code == 409 and "has 2 tags" in r.json()["error"]["message"]
    r = api.delete("/v1/images/imgt-http:1")
    assert r.status_code == 200
    assert r.json() == {"untagged": ["imgt-http:1"], "deleted": [], "space_reclaimed": 0}
    r = api.delete(f"/v1/images/{image_id[7:12]}")  # a short prefix names it too
    assert r.status_code == 200 and r.json()["deleted"] == [image_id]
    assert r.json()["untagged"] == ["imgt-http:2"] and r.json()["space_reclaimed"] > 0
    assert api.delete(f"/v1/images/{image_id}").status_code == 404


def test_rm_of_an_image_a_machine_uses_refuses_and_the_machine_still_starts(
        client: ember.Client, tmp_path: Path) -> None:
    image = client.images.import_path(layout(tmp_path, "used", Labels={"used": "1"}),
                                      tag="imgt-used:1")
    client.images.tag("imgt-used:1", "imgt-used:2")
    m = client.machines.create("imgt-used:1", name="imgt-user", cmd=["sleep", "600"],
                               start=False)
    try:
        # another tag goes: the image keeps its last one
        proc = ember_cli("image", "rm", "imgt-used:1")
        assert (proc.returncode, proc.stdout) == (0, "Untagged: imgt-used:1\n"), proc.stderr
        # its last tag, or the image by id: refused with one line, nothing changes
        for ref in ("imgt-used:2", image.id):
            proc = ember_cli("image", "rm", ref)
            assert proc.returncode == 125 and proc.stdout == ""
            (line,) = proc.stderr.splitlines()
            assert line.startswith("ember: error: image ") and \
                "is used by machine imgt-user" in line
        assert client.images.get(image.id).tags == ["imgt-used:2"]
        with pytest.raises(Conflict, match="imgt-user"):
            client.images.remove("imgt-used:2")
        # forced: the tag goes, the image stays for the machine (and prune leaves it)
        proc = ember_cli("image", "rm", "-f", "imgt-used:2")
        assert (proc.returncode, proc.stdout) == (0, "Untagged: imgt-used:2\n"), proc.stderr
        assert image.id not in client.images.prune().deleted
        assert m.start().state == "running"
        assert m.exec(["cat", "/etc/hostname"]).stdout == "imgt-user\n"
    finally:
        m.remove(force=True)
    assert client.images.prune().deleted == [image.id]


@pytest.fixture
def private(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon of its own data dir, for what would empty the session's store."""
    from conftest import Daemon

    d = Daemon(tmp_path / "home", private=True)
    d.home.mkdir()
    d.start()
    yield d
    d.stop()


def test_prune_all_keeps_only_what_machines_use(private: Daemon, tmp_path: Path) -> None:
    async def main() -> tuple[ember.api.models.ImageRemoval, list[list[str]]]:
        async with ember.AsyncClient(private.socket) as c:
            kept = await c.images.import_path(layout(tmp_path, "k", Labels={"k": "1"}),
                                              tag="keep:1")
            archive = oci_tar(layout(tmp_path, "g", Labels={"g": "1"}), tmp_path / "g.tar")
            gone = await c.images.upload(archive, tag="gone:1")
            await c.images.tag("gone:1", "gone:2")
            m = await c.machines.create("keep:1", name="holder", start=False)
            pruned = await c.images.prune(all=True)
            assert pruned.deleted == [gone.id] and kept.id not in pruned.deleted
            tags = [i.tags for i in await c.images.list()]
            await m.remove()
            again = await c.images.prune(all=True)
            assert again.deleted == [kept.id] and again.untagged == ["keep:1"]
            with pytest.raises(NotFound):
                await c.images.remove("keep:1")
            return pruned, tags

    pruned, tags = asyncio.run(main())
    assert pruned.untagged == ["gone:1", "gone:2"] and pruned.space_reclaimed > 0
    assert tags == [["keep:1"]]
    store = private.home / "images"
    assert list((store / "images").iterdir()) == []
    assert list((store / "blobs" / "sha256").iterdir()) == []
    assert list((store / "rootfs").iterdir()) == []
