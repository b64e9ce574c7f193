"""Resource limits as users get them: a daemon machine's QEMU runs in a cgroup holding it to
its ``cpus`` and ``memory_mib``, ``inspect`` shows the limits, the kernel's files hold them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from daemon_api import create, delete, get, run, start

from ember import paths
from ember.agent.protocol import ExecRequest
from ember.errors import MachineCrashed
from ember.guest.bundle import GuestBundle
from ember.host.cgroup import MachineCgroup, probe
from ember.host.probe import choose_accel
from ember.images import ImageStore
from ember.machine import Machine, MachineConfig
from ember.vmm import process
from ember.vmm.process import cgroup_name

if TYPE_CHECKING:
    from conftest import Daemon

pytestmark = pytest.mark.vm

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
SUPPORT = probe()
if not SUPPORT.ok:
    pytest.skip(f"no cgroup limits on this host: {SUPPORT.reason}", allow_module_level=True)


def documented_limit_mib(memory_mib: int, accel: str) -> int:
    """docs/architecture.md: guest RAM + 64 MiB + RAM/128 (+128 MiB for TCG)."""
    return memory_mib + 64 + memory_mib // 128 + (128 if accel == "tcg" else 0)


def fill_ram_cmd(memory_mib: int) -> str:
    """Write zeros to both guest tmpfs mounts until the guest's memory is all in use."""
    half = memory_mib * 40 // 100
    return (f"dd if=/dev/zero of=/tmp/a bs=1M count={half} 2>/dev/null; "
            f"dd if=/dev/zero of=/dev/shm/b bs=1M count={half} 2>/dev/null; "
            "grep Shmem: /proc/meminfo")


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.http() as c:
        yield c


@pytest.fixture(scope="module")
def limited(api: httpx.Client) -> Iterator[dict[str, Any]]:
    """A daemon machine with cpus=2, memory_mib=256, as `ember create` makes one (its
    root in guest memory: fill_ram_cmd fills RAM through it)."""
    create(api, name="lim", cmd=["sleep", "3600"], cpus=2, memory_mib=256, network="none",
           tmpfs_root=True)
    yield start(api, "lim")
    delete(api, "lim")


def test_inspect_shows_the_limits_and_the_kernel_holds_them(limited: dict[str, Any]) -> None:
    proc = subprocess.run([sys.executable, "-m", "ember", "inspect", "--json", "lim"],
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    (m,) = json.loads(proc.stdout)  # an array, as docker inspect prints
    limit = documented_limit_mib(256, m["accel"]) << 20
    limits = m["limits"]
    assert limits["version"] == str(SUPPORT.version)
    assert float(limits["cpus"]) == 2.0
    assert int(limits["memory_max_bytes"]) == limit
    cgroup = Path(limits["cgroup"])
    assert cgroup.name.startswith("lim-") and cgroup.parent.name == "ember"
    # The VMM is in that cgroup: the kernel says so, for every controller.
    assert str(m["pid"]) in (cgroup / "cgroup.procs").read_text().split()
    where = {}
    for line in Path(f"/proc/{m['pid']}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            where[c] = path
    if SUPPORT.version == 2:
        assert str(cgroup).endswith(where[""])
        assert (cgroup / "cpu.max").read_text().split() == ["200000", "100000"]
        assert int((cgroup / "memory.max").read_text()) == limit
    else:
        assert str(cgroup).endswith(where["memory"])
        cpu = SUPPORT.dirs["cpu"] / cgroup.name
        assert where["cpu"].endswith(f"/ember/{cgroup.name}")
        assert str(m["pid"]) in (cpu / "cgroup.procs").read_text().split()
        quota = int((cpu / "cpu.cfs_quota_us").read_text())
        assert quota / int((cpu / "cpu.cfs_period_us").read_text()) == 2.0
        assert int((cgroup / "memory.limit_in_bytes").read_text()) == limit
        memsw = cgroup / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            assert int(memsw.read_text()) == limit


def test_a_guest_using_all_its_ram_stays_under_the_limit_and_is_not_killed(
        api: httpx.Client, limited: dict[str, Any]) -> None:
    cgroup = Path(get(api, "lim")["limits"]["cgroup"])
    res = run(api, "lim", "sh", "-c", fill_ram_cmd(256), user="root", timeout=120)
    assert res["exit_code"] == 0, res
    shmem_kib = int(res["stdout"].split()[1])
    assert shmem_kib > 190 * 1024  # the guest really holds ~200 MiB of written pages
    # QEMU was charged for the guest's pages from its first instruction on, and
    # stayed within what it was given without being killed.
    v2 = SUPPORT.version == 2
    peak = int((cgroup / ("memory.peak" if v2 else "memory.max_usage_in_bytes")).read_text())
    limit = int(get(api, "lim")["limits"]["memory_max_bytes"])
    assert shmem_kib << 10 <= peak <= limit
    m = get(api, "lim")
    assert m["state"] == "running" and m["pid"] == limited["pid"]
    assert run(api, "lim", "true")["exit_code"] == 0


def test_stopping_the_machine_removes_its_cgroup(api: httpx.Client) -> None:
    create(api, name="lim2", cmd=["sleep", "3600"], network="none")
    applied = start(api, "lim2")["limits"]
    cgroup = Path(applied["cgroup"])
    assert cgroup.is_dir()
    m = api.post("/v1/machines/lim2/stop", params={"timeout": 0}).json()
    # the record keeps what was applied (and will be again), without the cgroup it had
    assert m["state"] == "stopped"
    assert m["limits"] == {k: v for k, v in applied.items() if k != "cgroup"}
    assert not cgroup.exists()
    delete(api, "lim2")


def test_a_machine_whose_memory_limit_is_too_small_is_oom_killed_and_cleaned_up(
        store: ImageStore, guest: GuestBundle, monkeypatch: pytest.MonkeyPatch) -> None:
    # The cap is real: with room for the guest's RAM but not QEMU's overhead,
    # the kernel kills this QEMU (and nothing else) once the guest fills its RAM.
    monkeypatch.setattr(process, "memory_limit_mib", lambda spec: spec.memory_mib)
    m = Machine.create(machines_dir=paths.machines_dir(), guest=guest,
                       rootfs=store.rootfs(store.resolve("sample:latest")),
                       accel=choose_accel(None),
                       config=MachineConfig(cpus=1, memory_mib=128, network="none",
                                            limit_resources=True))
    try:
        m.start()
        assert m.vm is not None and m.vm.cgroup is not None
        cg = m.vm.cgroup
        p = m.exec(ExecRequest(argv=["/bin/sh", "-c", fill_ram_cmd(128)], env=[PATH]))
        with pytest.raises(MachineCrashed, match="signal 9"):
            m.wait_process(p, timeout=120)
        assert cg.limits()["oom_kills"] in (1, None)  # None: kernel without the counter
    finally:
        m.close()
    assert not any(p.exists() for p in cg.paths)
    assert MachineCgroup.find(cgroup_name(m.spec)) is None

