"""A machine with ``limit_resources``: its QEMU runs in a cgroup holding it to its spec."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember import paths
from ember.agent.protocol import ExecRequest
from ember.errors import MachineCrashed
from ember.guest.bundle import GuestBundle
from ember.host.cgroup import CPU_PERIOD_US, MachineCgroup, probe
from ember.host.probe import choose_accel
from ember.images import ImageStore
from ember.machine import Machine, MachineConfig
from ember.vmm import process
from ember.vmm.process import cgroup_name, memory_limit_mib

pytestmark = pytest.mark.vm

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
SUPPORT = probe()
if not SUPPORT.ok:
    pytest.skip(f"no cgroup limits on this host: {SUPPORT.reason}", allow_module_level=True)


def limited(store: ImageStore, guest: GuestBundle, cpus: int, memory_mib: int) -> Machine:
    m = Machine.create(machines_dir=paths.machines_dir(), guest=guest,
                       rootfs=store.rootfs(store.resolve("sample:latest")),
                       accel=choose_accel(None),
                       config=MachineConfig(cpus=cpus, memory_mib=memory_mib, network="none"))
    return Machine(dataclasses.replace(m.spec, limit_resources=True))


def fill_guest_ram(m: Machine, memory_mib: int) -> str:
    """Write zeros to both guest tmpfs mounts until the guest's memory is all in use."""
    half = memory_mib * 40 // 100
    p = m.exec(ExecRequest(argv=["/bin/sh", "-c",
                                 f"dd if=/dev/zero of=/tmp/a bs=1M count={half} 2>/dev/null; "
                                 f"dd if=/dev/zero of=/dev/shm/b bs=1M count={half} 2>/dev/null; "
                                 "grep Shmem: /proc/meminfo"], env=[PATH]))
    assert m.wait_process(p, timeout=120).exit_code == 0
    return p.stdout.decode()


@pytest.fixture(scope="module")
def machine(store: ImageStore, guest: GuestBundle) -> Iterator[Machine]:
    m = limited(store, guest, cpus=2, memory_mib=256)
    m.start()
    yield m
    assert m.vm is not None and m.vm.cgroup is not None
    cgroup_dirs = m.vm.cgroup.paths
    try:
        m.shutdown()
    finally:
        m.close()
    assert not any(p.exists() for p in cgroup_dirs), "the cgroup outlived its machine"


def test_qemu_runs_in_its_cgroup_with_the_limits_of_its_spec(machine: Machine) -> None:
    vm = machine.vm
    assert vm is not None and vm.cgroup is not None
    cg = vm.cgroup
    assert cg.pids() == [vm.pid]
    # /proc/PID/cgroup: "ID:controllers:path" per hierarchy ("0::path" for v2).
    where = {}
    for line in Path(f"/proc/{vm.pid}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            where[c] = path
    for ctrl, d in cg.dirs.items():
        path = where["" if cg.version == 2 else ctrl]
        assert path.endswith(f"/ember/{cgroup_name(machine.spec)}") and str(d).endswith(path)

    limit = memory_limit_mib(machine.spec) << 20
    if cg.version == 2:
        assert (cg.path / "cpu.max").read_text().split() == [str(2 * CPU_PERIOD_US),
                                                             str(CPU_PERIOD_US)]
        assert int((cg.path / "memory.max").read_text()) == limit
    else:
        assert int((cg.dirs["cpu"] / "cpu.cfs_quota_us").read_text()) == 2 * CPU_PERIOD_US
        assert int((cg.dirs["cpu"] / "cpu.cfs_period_us").read_text()) == CPU_PERIOD_US
        assert int((cg.dirs["memory"] / "memory.limit_in_bytes").read_text()) == limit
        memsw = cg.dirs["memory"] / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            assert int(memsw.read_text()) == limit
    assert cg.limits()["cpus"] == 2.0 and cg.limits()["memory_max_bytes"] == limit

    # A restarted daemon finds the same cgroup by the machine's name.
    found = MachineCgroup.find(cgroup_name(machine.spec))
    assert found is not None and found.paths == cg.paths


def test_a_guest_using_all_its_ram_stays_under_the_limit_and_is_not_killed(
        machine: Machine) -> None:
    assert machine.vm is not None and machine.vm.cgroup is not None
    shmem_kib = int(fill_guest_ram(machine, 256).split()[1])
    assert shmem_kib > 190 * 1024  # the guest really holds ~200 MiB of written pages
    limits = machine.vm.cgroup.limits()
    # QEMU was charged for the guest's pages from its first instruction on, and
    # stayed within what it was given without being killed.
    assert shmem_kib << 10 <= limits["memory_peak_bytes"] <= limits["memory_max_bytes"]
    assert limits["oom_kills"] in (0, None)
    p = machine.exec(ExecRequest(argv=["/bin/true"], env=[PATH]))
    assert machine.wait_process(p, timeout=30).exit_code == 0


def test_a_machine_whose_memory_limit_is_too_small_is_oom_killed_and_cleaned_up(
        store: ImageStore, guest: GuestBundle, monkeypatch: pytest.MonkeyPatch) -> None:
    # The cap is real: with room for the guest's RAM but not QEMU's overhead,
    # the kernel kills this QEMU (and nothing else) once the guest fills its RAM.
    monkeypatch.setattr(process, "memory_limit_mib", lambda spec: spec.memory_mib)
    m = limited(store, guest, cpus=1, memory_mib=128)
    try:
        m.start()
        assert m.vm is not None and m.vm.cgroup is not None
        cg = m.vm.cgroup
        with pytest.raises(MachineCrashed, match="signal 9"):
            fill_guest_ram(m, 128)
        assert cg.limits()["oom_kills"] in (1, None)  # None: kernel without the counter
    finally:
        m.close()
    assert not any(p.exists() for p in cg.paths)
    assert MachineCgroup.find(cgroup_name(m.spec)) is None

