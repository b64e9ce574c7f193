"""Named volumes' store (``volumes/store.py``) without a VM: mkfs.ext4 on sparse files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ember import paths
from ember.volumes.store import (
    MIN_SIZE,
    VolumeError,
    VolumeExists,
    VolumeInUse,
    VolumeMount,
    VolumeNotFound,
    VolumeRequest,
    VolumeStore,
    check_mounts,
    cmdline_param,
    hold,
    parse_volume_flag,
)

pytestmark = pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="no mkfs.ext4")


@pytest.fixture
def store(tmp_path: Path) -> VolumeStore:
    return VolumeStore(tmp_path / "volumes")


def test_volumes_dir_is_in_the_data_dir(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    assert paths.volumes_dir() == tmp_path / "volumes"


def test_create_get_list_and_sizes(store: VolumeStore) -> None:
    assert store.list() == []
    vol = store.create("data", 1 << 30)
    assert vol.size == 1 << 30 and vol.path.stat().st_size == 1 << 30
    # an ext4 superblock (magic 0xEF53 at 1080)
    with open(vol.path, "rb") as f:
        f.seek(1080)
        assert f.read(2) == b"\x53\xef"
    doc = vol.to_json()
    assert set(doc) == {"name", "size_bytes", "disk_bytes", "created_at", "in_use", "path"}
    assert doc["name"] == "data" and doc["size_bytes"] == 1 << 30 and not doc["in_use"]
    assert 0 < doc["disk_bytes"] < (1 << 30) // 10, "the image is sparse"
    assert store.get("data") == vol
    store.create("b.2", MIN_SIZE)
    assert [v.name for v in store.list()] == ["b.2", "data"]


def test_exists_bad_names_and_sizes(store: VolumeStore) -> None:
    store.create("v1", MIN_SIZE)
    with pytest.raises(VolumeExists, match="exists already"):
        store.create("v1", MIN_SIZE)
    for bad in ("", "-x", "a/b", "..", "a b", "x" * 129):
        with pytest.raises(VolumeError, match="invalid volume name"):
            store.create(bad, MIN_SIZE)
    with pytest.raises(VolumeError, match="size"):
        store.create("small", MIN_SIZE - 1)
    assert [v.name for v in store.list()] == ["v1"]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")], "no leftovers"


def test_get_and_remove_unknown(store: VolumeStore) -> None:
    with pytest.raises(VolumeNotFound):
        store.get("nope")
    with pytest.raises(VolumeNotFound):
        store.get("../etc")
    with pytest.raises(VolumeNotFound):
        store.remove("nope")


def test_rm(store: VolumeStore) -> None:
    vol = store.create("gone", MIN_SIZE)
    store.remove("gone")
    assert not vol.dir.exists() and store.list() == []
    with pytest.raises(VolumeNotFound):
        store.get("gone")


def test_rm_and_hold_while_a_process_holds_the_lock(store: VolumeStore) -> None:
    store.create("busy", MIN_SIZE)
    mount = store.mount(VolumeRequest("busy", "/data"))
    assert mount == VolumeMount("busy", store.get("busy").path, "/data", False)
    fd = hold(mount)
    # a child that inherits the lock, as QEMU does
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             pass_fds=(fd,))
    os.close(fd)
    try:
        assert store.get("busy").in_use()
        assert store.get("busy").to_json()["in_use"] is True
        with pytest.raises(VolumeInUse, match="in use"):
            store.remove("busy")
        with pytest.raises(VolumeInUse):
            hold(mount)
    finally:
        child.kill()
        child.wait()
    assert not store.get("busy").in_use()
    store.remove("busy")
    with pytest.raises(VolumeNotFound):
        hold(mount)


@pytest.mark.parametrize(("text", "want"), [
    ("data:/data", VolumeRequest("data", "/data")),
    ("data:/data:ro", VolumeRequest("data", "/data", True)),
    ("data:/data:rw", VolumeRequest("data", "/data")),
    ("d.1:/var/lib/x/", VolumeRequest("d.1", "/var/lib/x")),
])
def test_parse_volume_flag(text: str, want: VolumeRequest) -> None:
    assert parse_volume_flag(text) == want
    assert str(want) == text.removesuffix(":rw").replace("/x/", "/x")


@pytest.mark.parametrize(("text", "match"), [
    ("data", "NAME:/PATH"),
    ("data:", "NAME:/PATH"),
    (":/data", "NAME:/PATH"),
    ("a:/b:c:d", "NAME:/PATH"),
    ("data:/data:rx", "mode"),
    ("/nonexistent/ember-test:/data", "does not exist"),
    ("/etc/hostname:/data", "is not a directory"),
    ("/:/data", "root directory"),
    ("data:relative", "mount path"),
    ("data:/", "mount path"),
    ("data:/..", "mount path"),
    ("data:/a b", "mount path"),
    ("-x:/data", "volume name"),
])
def test_parse_volume_flag_refusals(text: str, match: str) -> None:
    with pytest.raises(VolumeError, match=match) as info:
        parse_volume_flag(text)
    assert "\n" not in str(info.value)


def test_mounts_together_and_on_the_command_line(tmp_path: Path) -> None:
    a = VolumeMount("a", tmp_path / "a", "/a")
    b = VolumeMount("b", tmp_path / "b", "/b", True)
    check_mounts((a, b))
    with pytest.raises(VolumeError, match="given twice"):
        check_mounts((a, VolumeMount("a", tmp_path / "a", "/c")))
    with pytest.raises(VolumeError, match="given twice"):
        check_mounts((a, VolumeMount("b", tmp_path / "b", "/a")))
    with pytest.raises(VolumeError, match="at most 16"):
        check_mounts(tuple(VolumeMount(f"v{i}", tmp_path, f"/m{i}") for i in range(17)))
    assert cmdline_param(()) == ""
    assert cmdline_param((a, b)) == "ember.volumes=0:/a:rw,1:/b:ro"


def test_shares_parse_resolve_and_go_with_volumes(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.volumes.shares import ShareMount
    from ember.volumes.shares import cmdline_param as shares_param

    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "home"))
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    got = parse_volume_flag("./link:/src/:ro", cwd=str(tmp_path))
    # a host directory, resolved (symlinks too) against the caller's directory
    assert got == ShareMount(tmp_path / "real", "/src", True)
    assert isinstance(parse_volume_flag("data:/data"), VolumeRequest)
    share = ShareMount(tmp_path / "real", "/s")
    vol = VolumeMount("a", tmp_path / "a", "/a")
    check_mounts((vol,), (share,))
    with pytest.raises(VolumeError, match="given twice"):
        check_mounts((vol,), (ShareMount(tmp_path, "/a"),))
    with pytest.raises(VolumeError, match="cannot nest"):
        check_mounts((vol,), (ShareMount(tmp_path, "/a/b"),))
    with pytest.raises(VolumeError, match="at most 32 shares"):
        check_mounts((), tuple(ShareMount(tmp_path, f"/m{i}") for i in range(33)))
    with pytest.raises(VolumeError, match="too long"):
        check_mounts((), tuple(ShareMount(tmp_path, "/" + f"{i}" * 60) for i in range(1, 10))
                     + tuple(ShareMount(tmp_path, "/x" + f"{i}" * 60) for i in range(1, 10)))
    assert shares_param((share, got)) == "ember.shares=0:/s:rw,1:/src:ro"
    # Ember's own data must stay out of reach: neither in a share nor holding one
    (tmp_path / "home" / "machines").mkdir(parents=True)
    for inside in (tmp_path, tmp_path / "home", tmp_path / "home" / "machines"):
        with pytest.raises(VolumeError, match="data directory"):
            parse_volume_flag(f"{inside}:/x")
