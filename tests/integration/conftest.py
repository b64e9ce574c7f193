"""Fixtures for tests that boot real microVMs.

The guest kernel and agent come from the user's cache (built once, about three
minutes; ``scripts/test`` runs ``ember setup`` first). Images and machines
live in a data directory private to the test session. Machines that tests can
share are booted once per module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember import paths
from ember.guest.bundle import GuestBundle, ensure_guest
from ember.host.probe import choose_accel, qemu_path
from ember.images import ImageStore
from ember.machine import Machine, MachineConfig
from ember.sample import DEFAULT_CONFIG, write_busybox_image

pytestmark = pytest.mark.vm


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.vm)
        if "security" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.security)


@pytest.fixture(scope="session")
def ember_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if qemu_path() is None:
        pytest.fail("qemu-system-x86_64 is not installed: run scripts/bootstrap")
    home = tmp_path_factory.mktemp("ember-home")
    old = os.environ.get("EMBER_HOME")
    os.environ["EMBER_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("EMBER_HOME", None)
    else:
        os.environ["EMBER_HOME"] = old


@pytest.fixture(scope="session")
def guest(ember_home: Path) -> GuestBundle:
    return ensure_guest(paths.cache_dir(), lambda m: print(m, file=sys.stderr))


@pytest.fixture(scope="session")
def sample_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_busybox_image(tmp_path_factory.mktemp("layouts") / "sample")


@pytest.fixture(scope="session")
def store(ember_home: Path, guest: GuestBundle, sample_layout: Path,
          tmp_path_factory: pytest.TempPathFactory) -> ImageStore:
    """The session's store, holding ``sample:latest`` and ``entry:latest`` with rootfs built."""
    store = ImageStore(paths.images_dir())
    sample = store.import_path(sample_layout, tag="sample:latest")
    store.rootfs(sample)
    entry_cfg = {**DEFAULT_CONFIG, "Entrypoint": ["/bin/echo", "entry"], "Cmd": ["default"],
                 "User": "", "WorkingDir": ""}
    entry = store.import_path(
        write_busybox_image(tmp_path_factory.mktemp("layouts") / "entry", layers=1,
                            config=entry_cfg), tag="entry:latest")
    store.rootfs(entry)
    return store


@pytest.fixture(scope="module")
def machine(store: ImageStore, guest: GuestBundle) -> Iterator[Machine]:
    """One booted sample machine, shared by the tests of a module."""
    m = Machine.create(machines_dir=paths.machines_dir(), guest=guest,
                       rootfs=store.rootfs(store.resolve("sample:latest")),
                       accel=choose_accel(None), config=MachineConfig(cpus=2, memory_mib=256))
    m.start()
    yield m
    try:
        m.shutdown()
    finally:
        m.close()


class Daemon:
    """A real ``ember serve`` process on the test session's data dir."""

    def __init__(self, home: Path, *, private: bool = False) -> None:
        """``private``: a daemon of its own data dir ``home`` (not the session's)."""
        self.home = home
        self.env = {**os.environ, "EMBER_HOME": str(home)} if private else None
        self.socket = home / "ember.sock"
        self.log = home / "daemon.test.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> None:
        import httpx

        assert self.proc is None or self.proc.poll() is not None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ember", "serve", *args],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"ember serve exited: {self.log.read_text()[-2000:]}")
            try:
                self.http().get("/v1/version").raise_for_status()
                return
            except (httpx.TransportError, OSError):
                time.sleep(0.05)
        pytest.fail("ember serve did not answer within 30 s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def http(self, timeout: float = 120.0) -> Any:
        import httpx

        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                            base_url="http://ember", timeout=timeout)


@pytest.fixture(scope="session")
def daemon(ember_home: Path, store: ImageStore) -> Iterator[Daemon]:
    """One daemon for the session (tests that restart it put it back up)."""
    d = Daemon(ember_home)
    d.start()
    yield d
    with d.http() as c:
        for m in c.get("/v1/machines").json():
            c.delete(f"/v1/machines/{m['id']}", params={"force": "true"})
    d.stop()
    # a safety net: whatever a failed test left, no QEMU of this session outlives it
    from ember.vmm.process import kill_strays

    for state_dir in ember_home.glob("machines/daemon/*/*"):
        if state_dir.is_dir():
            kill_strays(state_dir)
