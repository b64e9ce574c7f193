"""The snapshot store and manifests without a VM: validation, lookup, locks, eviction."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

import pytest

from ember.snapshots.manifest import FileRef, Manifest, SnapshotError
from ember.snapshots.store import SnapshotInUse, SnapshotNotFound, SnapshotStore


def _file(tmp: Path, name: str, data: bytes) -> FileRef:
    p = tmp / name
    p.write_bytes(data)
    return FileRef.of(p)


def _manifest(tmp: Path, snap_id: str, state: bytes, **changes: Any) -> Manifest:
    import hashlib

    doc = dict(
        id=snap_id, kind="user", created=f"2026-12-01T00:00:0{len(changes)}.000Z",
        qemu_version="7.2", qemu_build="b" * 64, accel="tcg", cpu_model="qemu64", cpus=1,
        memory_mib=64, network="user", devices=("virtio-serial", "virtio-blk:ro"),
        kernel=_file(tmp, "k", b"kernel"), initramfs=_file(tmp, "i", b"initrd"),
        rootfs=_file(tmp, "r", b"rootfs"), cmdline="console=ttyS0", image_id="sha256:x",
        image_ref="app:1", image_config={"Cmd": ["sh"]}, state_size=len(state),
        state_sha256=hashlib.sha256(state).hexdigest(), memory_size=64 << 20,
        memory_allocated=4096, size_on_disk=8192, pause_ms=12.5)
    doc.update(changes)
    return Manifest(**doc)  # type: ignore[arg-type]


def _commit(store: SnapshotStore, tmp: Path, **changes: Any) -> Any:
    snap_id, d, lock = store.new_tmp()
    state = b"device state " * 10
    (d / "state").write_bytes(state)
    with open(d / "memory", "wb") as f:
        f.truncate(64 << 20)
    return store.commit(d, lock, _manifest(tmp, snap_id, state, **changes))


def test_a_committed_snapshot_is_found_by_id_prefix_and_tag(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snaps", "user")
    a = _commit(store, tmp_path, tag="web-v1")
    b = _commit(store, tmp_path)
    assert store.get("web-v1").id == a.id
    assert store.get(a.id).id == a.id
    assert store.get(b.id[:10]).id == b.id
    assert [s.id for s in store.all()] == sorted([a.id, b.id],
                                                 key=lambda i: store.get(i).manifest.created)
    spec = store.get("web-v1").restore_spec()
    assert spec.snapshot_id == a.id and spec.memory.name == "memory"
    with pytest.raises(SnapshotNotFound):
        store.get("nope")
    # a tag is unique: the second writer's directory goes
    with pytest.raises(SnapshotError, match="exists already"):
        _commit(store, tmp_path, tag="web-v1")
    assert len(store.all()) == 2
    assert not [p for p in (tmp_path / "snaps").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("format", 2, "format 2"),
    ("id", "../etc", "'id' is malformed"),
    ("kind", "other", "'kind' must be one of"),
    ("cpus", 0, "out of range"),
    ("cpus", True, "wrong type"),
    ("memory_size", 1, "does not match memory_mib"),
    ("tag", "has space", "'tag' is malformed"),
    ("kernel", {"path": "/k", "size": 1}, "'sha256' is missing"),
    ("devices", "virtio", "wrong type"),
    ("pause_ms", -1, "out of range"),
])
def test_manifests_are_validated(tmp_path: Path, field: str, value: Any, message: str) -> None:
    doc = _manifest(tmp_path, "a" * 32, b"s").to_json()
    doc[field] = value
    with pytest.raises(SnapshotError, match=message):
        Manifest.from_json(doc)
    with pytest.raises(SnapshotError, match="not a JSON object"):
        Manifest.from_json([doc])


def test_damaged_snapshots_are_reported_and_removable(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snaps", "user")
    snap = _commit(store, tmp_path)
    os.chmod(snap.path / "state", 0o644)
    (snap.path / "state").write_bytes(b"changed")
    with pytest.raises(SnapshotError, match="device state does not match"):
        store.get(snap.id).restore_spec()
    manifest = snap.path / "manifest.json"
    os.chmod(manifest, 0o644)
    manifest.write_text("{not json")
    with pytest.raises(SnapshotError, match="manifest is unreadable"):
        store.get(snap.id)
    assert store.all() == []  # listed ones are valid ones
    assert store.remove(snap.id) is None  # damaged, and gone
    assert not snap.path.exists()


def test_a_snapshot_mapped_by_a_clone_is_in_use(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snaps", "user")
    snap = _commit(store, tmp_path)
    fd = os.open(snap.path / "memory", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # what a clone's QEMU holds while it runs
    try:
        assert store.in_use(snap)
        with pytest.raises(SnapshotInUse, match="in use"):
            store.remove(snap.id)
        assert store.evict(0) == []
    finally:
        os.close(fd)
    assert not store.in_use(snap)
    store.remove(snap.id)
    assert store.all() == []


def test_eviction_removes_the_least_recently_used_first(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "boot", "boot")
    snaps = [_commit(store, tmp_path, kind="boot") for _ in range(3)]
    now = time.time()
    for age, s in zip((30, 10, 20), snaps, strict=True):
        os.utime(s.path / "used", (now - age, now - age))
    each = snaps[0].manifest.size_on_disk
    assert store.evict(each * 2) == [snaps[0].id]
    assert store.evict(each, keep=snaps[1].id) == [snaps[2].id]
    assert [s.id for s in store.all()] == [snaps[1].id]


def test_file_refs_notice_a_changed_dependency(tmp_path: Path) -> None:
    ref = _file(tmp_path, "rootfs", b"one")
    ref.check("root filesystem")
    (tmp_path / "rootfs").write_bytes(b"two")
    with pytest.raises(SnapshotError, match="has changed"):
        ref.check("root filesystem")
    (tmp_path / "rootfs").unlink()
    with pytest.raises(SnapshotError, match="which is gone"):
        ref.check("root filesystem")
