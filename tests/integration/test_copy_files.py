"""ember.files in a real guest booted from an image with no tar and no shell at all."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember import paths
from ember.agent.client import ExecFailed
from ember.agent.protocol import ExecRequest
from ember.files import (
    GuestPathNotFound,
    extract_to_host,
    get_archive,
    get_file,
    put_archive,
    put_file,
)
from ember.guest.bundle import GuestBundle
from ember.host.probe import choose_accel
from ember.images import ImageStore
from ember.machine import Machine, MachineConfig
from ember.sample import PASSWD, write_oci_layout

T = 60.0


def distroless_layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in (("etc/passwd", PASSWD.encode()), ("app/config", b"answer=42\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def bare(store: ImageStore, guest: GuestBundle,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    """One machine of an image holding two files and no programs (like a distroless image)."""
    layout = write_oci_layout(tmp_path_factory.mktemp("layouts") / "bare", [distroless_layer()],
                              {"Cmd": ["/app/none"]})
    image = store.import_path(layout, tag="bare:latest")
    m = Machine.create(machines_dir=paths.machines_dir(), guest=guest,
                       rootfs=store.rootfs(image), accel=choose_accel(None),
                       config=MachineConfig(cpus=1, memory_mib=256))
    m.start()
    yield m
    try:
        m.shutdown()
    finally:
        m.close()


def test_the_image_really_has_no_tar(bare: Machine) -> None:
    with pytest.raises(ExecFailed) as info:
        bare.wait_process(bare.exec(ExecRequest(["tar", "--help"])), T)
    assert info.value.code == 127


def test_put_a_file_and_get_it_back_byte_exact(bare: Machine) -> None:
    data = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(40000))
    put_file(bare, "/data/blob.bin", data, mode=0o600)
    assert get_file(bare, "/data/blob.bin") == data
    assert get_file(bare, "app/config") == b"answer=42\n"  # relative to the guest's /


def test_put_a_tree_and_get_it_back(bare: Machine, tmp_path: Path) -> None:
    src = tmp_path / "src" / "site"
    (src / "css").mkdir(parents=True)
    (src / "index.html").write_text("<h1>hi</h1>\n")
    (src / "css" / "main.css").write_bytes(b"body{}\n" * 10000)
    (src / "latest").symlink_to("index.html")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(src, arcname="site")
    put_archive(bare, "/srv/www", buf.getvalue())

    archive = get_archive(bare, "/srv/www/site")
    extract_to_host(archive, tmp_path / "back")
    back = tmp_path / "back" / "site"
    assert (back / "index.html").read_text() == "<h1>hi</h1>\n"
    assert (back / "css" / "main.css").read_bytes() == b"body{}\n" * 10000
    assert (back / "latest").readlink() == Path("index.html")


def test_getting_a_missing_path_says_so(bare: Machine) -> None:
    with pytest.raises(GuestPathNotFound,
                       match=f"^/no/such/file: no such file or directory in machine {bare.name}$"):
        get_archive(bare, "/no/such/file")


def test_an_archive_of_the_root_leaves_out_the_api_filesystems(bare: Machine,
                                                                tmp_path: Path) -> None:
    archive = get_archive(bare, "/")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tf:
        names = tf.getnames()
    assert "./app/config" in names and "./etc/passwd" in names
    assert not [n for n in names if n.split("/")[1] in ("proc", "sys", "dev")]
    extract_to_host(archive, tmp_path / "root")  # nothing a host extraction refuses
    assert (tmp_path / "root" / "app" / "config").read_bytes() == b"answer=42\n"
