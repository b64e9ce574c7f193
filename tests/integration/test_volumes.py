"""Named volumes on real guests: data that outlives machines, one machine at a time.

A volume is an ext4 disk image in the data dir; a machine mounts it where it
asks. What one machine wrote, the next one reads; a second running machine
cannot attach it, nor can it be removed while a machine has it; ``:ro`` is
read-only in the guest; a machine with a volume is never snapshotted.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import vms
from vms import halt

from ember import paths
from ember.agent.protocol import ExecRequest
from ember.errors import EmberError
from ember.guest.bundle import GuestBundle
from ember.images import ImageStore
from ember.machine import Machine, MachineConfig
from ember.volumes.store import VolumeInUse, VolumeRequest, VolumeStore

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture(scope="module")
def volumes(ember_home: object) -> VolumeStore:
    return VolumeStore(paths.data_dir() / "volumes")


@pytest.fixture
def vol(volumes: VolumeStore) -> Iterator[str]:
    volumes.create("data", 64 << 20)
    yield "data"
    volumes.remove("data")


def boot(store: ImageStore, guest: GuestBundle, volumes: VolumeStore,
         *requests: VolumeRequest) -> Machine:
    return vms.boot(store, guest,
                    MachineConfig(volumes=tuple(volumes.mount(r) for r in requests)))


def sh(m: Machine, script: str) -> tuple[int | None, str]:
    p = m.exec(ExecRequest(argv=["/bin/sh", "-c", script], env=[PATH], user="root"))
    st = m.wait_process(p, timeout=60)
    return st.exit_code, (p.stdout + p.stderr).decode()




def test_a_volume_keeps_its_data_from_one_machine_to_the_next(
        store: ImageStore, guest: GuestBundle, volumes: VolumeStore, vol: str) -> None:
    a = boot(store, guest, volumes, VolumeRequest(vol, "/data"))
    try:
        assert sh(a, "mount | grep ' /data '")[1].startswith("/dev/sda on /data type ext4")
        assert sh(a, "seq 1 1000 > /data/numbers && sync")[0] == 0
    finally:
        halt(a)
    b = boot(store, guest, volumes, VolumeRequest(vol, "/mnt/other"))
    try:
        code, out = sh(b, "wc -l < /mnt/other/numbers; tail -1 /mnt/other/numbers")
        assert (code, out.split()) == (0, ["1000", "1000"])
    finally:
        halt(b)
    # the image is sparse: 64 MiB asked for, a few hundred KiB on the host's disk
    assert volumes.get(vol).disk_bytes() < 16 << 20


def test_a_volume_in_use_cannot_be_attached_again_nor_removed(
        store: ImageStore, guest: GuestBundle, volumes: VolumeStore, vol: str) -> None:
    a = boot(store, guest, volumes, VolumeRequest(vol, "/data"))
    try:
        assert volumes.get(vol).in_use()
        for readonly in (False, True):  # an ext4 mounted twice is corrupted: no second user
            with pytest.raises(VolumeInUse, match="in use"):
                boot(store, guest, volumes, VolumeRequest(vol, "/data", readonly))
        with pytest.raises(VolumeInUse, match="in use by a running machine"):
            volumes.remove(vol)
        # and a machine with a volume is never snapshotted
        from ember.snapshots.start import user_store
        from ember.snapshots.take import begin

        with pytest.raises(EmberError, match="it has volumes"):
            begin(a, user_store())
    finally:
        a.kill()
        a.close()
    assert not volumes.get(vol).in_use()  # QEMU's death let go of it, however it died


def test_a_read_only_volume_refuses_writes(store: ImageStore, guest: GuestBundle,
                                           volumes: VolumeStore, vol: str) -> None:
    m = boot(store, guest, volumes, VolumeRequest(vol, "/data", readonly=True))
    try:
        code, out = sh(m, "touch /data/x")
        assert code != 0 and "Read-only file system" in out
    finally:
        halt(m)


def test_through_the_daemon_a_volume_outlives_machines_and_serves_one_at_a_time(
        daemon: object) -> None:
    from daemon_api import create, delete, run, start

    with daemon.http() as api:  # type: ignore[attr-defined]
        r = api.post("/v1/volumes", json={"name": "shared", "size_bytes": 64 << 20})
        assert r.status_code == 201, r.text
        try:
            spec = [{"name": "shared", "target": "/srv/data"}]
            create(api, name="vol-a", cmd=["sleep", "3600"], volumes=spec)
            create(api, name="vol-b", cmd=["sleep", "3600"], volumes=spec)
            start(api, "vol-a")
            assert run(api, "vol-a", "sh", "-c", "echo kept > /srv/data/note && sync",
                       user="root")["exit_code"] == 0
            # b cannot start while a has the volume; nor can the volume go
            r = api.post("/v1/machines/vol-b/start")
            assert r.status_code == 409 and "in use" in r.json()["error"]["message"]
            assert api.delete("/v1/volumes/shared").status_code == 409
            assert api.post("/v1/machines/vol-a/stop").status_code == 200
            start(api, "vol-b")
            assert run(api, "vol-b", "cat", "/srv/data/note")["stdout"] == "kept\n"
            listed = {v["name"]: v for v in api.get("/v1/volumes").json()}
            assert listed["shared"]["in_use"] is True
        finally:
            delete(api, "vol-a")
            delete(api, "vol-b")
            assert api.delete("/v1/volumes/shared").status_code == 204


def test_a_volume_its_machine_died_with_still_mounts_read_write_and_read_only(
        store: ImageStore, guest: GuestBundle, volumes: VolumeStore, vol: str) -> None:
    a = boot(store, guest, volumes, VolumeRequest(vol, "/data"))
    try:
        assert sh(a, "echo synced > /data/f && sync")[0] == 0
    finally:
        a.kill()  # no unmount: the journal is left to replay
        a.close()
    ro = boot(store, guest, volumes, VolumeRequest(vol, "/data", readonly=True))
    try:
        assert sh(ro, "cat /data/f") == (0, "synced\n")
    finally:
        halt(ro)
    rw = boot(store, guest, volumes, VolumeRequest(vol, "/data"))
    try:
        assert sh(rw, "cat /data/f && echo more >> /data/f") == (0, "synced\n")
    finally:
        halt(rw)
