"""What a machine is given reaches its guest: CPUs and memory; and a restart starts clean."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest
from daemon_api import create, delete, run, start

from ember.images import ImageStore

if TYPE_CHECKING:
    from conftest import Daemon

PROBE = "nproc; grep MemTotal: /proc/meminfo"


def guest_resources(out: str) -> tuple[int, int]:
    """(CPUs, MemTotal in MiB) from PROBE's output."""
    nproc, meminfo = out.splitlines()
    return int(nproc), int(meminfo.split()[1]) // 1024


def assert_512_mib(mem_mib: int) -> None:
    # MemTotal is the RAM less what the kernel keeps for itself (a few MiB here):
    # clearly 512 MiB, neither the default 256 nor more than was given.
    assert 448 < mem_mib <= 512, mem_mib


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.http() as c:
        yield c


def test_ember_run_cpus_and_memory_reach_the_guest(store: ImageStore) -> None:
    proc = subprocess.run([sys.executable, "-m", "ember.cli", "run", "-q", "--cpus", "2",
                           "-m", "512", "sample", "--", "sh", "-c", PROBE],
                          capture_output=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    cpus, mem = guest_resources(proc.stdout.decode())
    assert cpus == 2
    assert_512_mib(mem)


def test_ember_run_defaults_are_one_cpu_and_256_mib(store: ImageStore) -> None:
    proc = subprocess.run([sys.executable, "-m", "ember.cli", "run", "-q", "sample", "--",
                           "sh", "-c", PROBE],
                          capture_output=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    cpus, mem = guest_resources(proc.stdout.decode())
    assert cpus == 1 and 192 < mem <= 256, (cpus, mem)


def test_daemon_machine_cpus_and_memory_reach_the_guest(api: httpx.Client) -> None:
    create(api, name="big", cmd=["sleep", "3600"], cpus=2, memory_mib=512, network="none")
    try:
        start(api, "big")
        res = run(api, "big", "sh", "-c", PROBE)
        assert res["exit_code"] == 0, res
        cpus, mem = guest_resources(res["stdout"])
        assert cpus == 2
        assert_512_mib(mem)
    finally:
        delete(api, "big")


def test_a_restarted_machine_with_a_tmpfs_root_starts_from_a_clean_writable_layer(
        api: httpx.Client) -> None:
    # (a root layer on disk keeps the writes instead: test_rootfs.py)
    create(api, name="scratch", cmd=["sleep", "3600"], network="none", tmpfs_root=True)
    try:
        start(api, "scratch")
        res = run(api, "scratch", "sh", "-c",
                  "echo x > /etc/written && echo y > /app/written && rm /app/hello.sh && "
                  "ls /etc/written /app/written", user="root")
        assert res["exit_code"] == 0, res
        r = api.post("/v1/machines/scratch/stop", params={"timeout": 0})
        assert r.status_code == 200 and r.json()["state"] == "stopped"
        start(api, "scratch")
        res = run(api, "scratch", "sh", "-c",
                  "ls /etc/written /app/written 2>&1; ls /app/hello.sh", user="root")
        assert res["exit_code"] == 0, res  # the image's file is back ...
        assert res["stdout"].count("No such file") == 2, res  # ... and the writes are gone
        assert "/app/hello.sh" in res["stdout"]
    finally:
        delete(api, "scratch")
