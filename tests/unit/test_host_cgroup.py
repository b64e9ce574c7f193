"""cgroup limits for QEMU, on fake cgroup trees laid out like v2, hybrid v1 and read-only hosts.

The fake trees are plain directories: the code under test takes the mount
directory and ``/proc/self`` as parameters. One thing a plain directory cannot
do is vanish with files in it, which a cgroup does; ``fake_rmdir`` stands in
for the kernel there (and refuses while a live process is listed, as it would).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ember.errors import HostError
from ember.host import cgroup as cgmod
from ember.host.cgroup import CPU_PERIOD_US, MachineCgroup, probe
from ember.vmm.process import QEMU_BASE_OVERHEAD_MIB, _cgroup_join, memory_limit_mib
from ember.vmm.qemu import TCG_TB_SIZE_MIB
from ember.vmm.spec import MachineSpec


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def fake_rmdir(path: str | os.PathLike[str]) -> None:
    """rmdir as the kernel does it for a cgroup: EBUSY while a live process is in it."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(p))
    procs = p / "cgroup.procs"
    pids = [int(x) for x in procs.read_text().split()] if procs.exists() else []
    if any(_alive(pid) for pid in pids):
        raise OSError(errno.EBUSY, "Device or resource busy", str(p))
    shutil.rmtree(p)


@pytest.fixture(autouse=True)
def _kernel_rmdir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgmod, "_rmdir", fake_rmdir)


def put(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def proc_self(tmp: Path, cgroup: str, mountinfo: str | None = None) -> Path:
    d = tmp / "proc-self"
    put(d / "cgroup", cgroup)
    if mountinfo is not None:
        put(d / "mountinfo", mountinfo)
    return d


def v2_dir(d: Path, *, controllers: str = "cpuset cpu io memory pids", subtree: str = "",
           root: bool = False) -> Path:
    put(d / "cgroup.controllers", controllers)
    put(d / "cgroup.subtree_control", subtree)
    put(d / "cgroup.procs")
    if not root:
        put(d / "cgroup.type", "domain")
    return d


def v1_tree(root: Path, memory_own: str = "/sandbox") -> None:
    """This machine's layout: a controller-less v2 at unified/, v1 cpu and memory."""
    v2_dir(root / "unified", controllers="", root=True)
    for d in (root / "cpu",):
        put(d / "cpu.cfs_quota_us", "-1")
        put(d / "cpu.cfs_period_us", "100000")
    for d in (root / "memory", root / "memory" / memory_own.strip("/")):
        put(d / "memory.limit_in_bytes", "9223372036854771712")


# -- cgroup v2 -------------------------------------------------------------------------


def test_v2_at_the_root_enables_controllers_and_writes_cpu_max_and_memory_max(
        tmp_path: Path) -> None:
    root = v2_dir(tmp_path / "cg", root=True)
    support = probe(root, proc_self(tmp_path, "0::/\n"))
    assert support.ok and support.version == 2
    assert support.controllers == ("cpu", "memory")
    assert support.dirs == {"cpu": root / "ember", "memory": root / "ember"}

    cg = MachineCgroup.create("m1", 2, 300, support)
    assert cg is not None and cg.paths == (root / "ember" / "m1",)
    # The no-internal-processes rule: controllers are enabled in each parent.
    assert set((root / "cgroup.subtree_control").read_text().split()) == {"+cpu", "+memory"}
    assert set((root / "ember" / "cgroup.subtree_control").read_text().split()) == {
        "+cpu", "+memory"}
    assert (cg.path / "cpu.max").read_text() == f"{2 * CPU_PERIOD_US} {CPU_PERIOD_US}"
    assert (cg.path / "memory.max").read_text() == str(300 << 20)
    limits = cg.limits()
    assert limits["version"] == 2 and limits["cpus"] == 2.0
    assert limits["memory_max_bytes"] == 300 << 20

    cg.add(4242)
    assert (cg.path / "cgroup.procs").read_text() == "4242"


def test_v2_inside_a_delegated_subtree_goes_next_to_its_own_cgroup(tmp_path: Path) -> None:
    # systemd's Delegate=yes + DelegateSubgroup=supervisor: Ember runs in
    # svc/supervisor; svc holds no processes and hands cpu and memory down.
    root = v2_dir(tmp_path / "cg", root=True, subtree="cpu memory pids")
    svc = v2_dir(root / "svc", subtree="cpu memory")
    v2_dir(svc / "supervisor")
    support = probe(root, proc_self(tmp_path, "0::/svc/supervisor\n"))
    assert support.version == 2 and support.dirs["memory"] == svc / "ember"
    cg = MachineCgroup.create("m1", 1, 200, support)
    assert cg is not None and cg.path == svc / "ember" / "m1"
    assert (svc / "cgroup.subtree_control").read_text() == "cpu memory"  # left alone


def test_v2_just_below_the_root_uses_the_root_which_may_enable_controllers(
        tmp_path: Path) -> None:
    root = v2_dir(tmp_path / "cg", root=True, subtree="pids")
    v2_dir(root / "ember-daemon")
    support = probe(root, proc_self(tmp_path, "0::/ember-daemon\n"))
    assert support.version == 2 and support.dirs["cpu"] == root / "ember"
    cg = MachineCgroup.create("m1", 1, 200, support)
    assert cg is not None and cg.path == root / "ember" / "m1"
    assert set((root / "cgroup.subtree_control").read_text().split()) == {"+cpu", "+memory"}


def test_v2_own_cgroup_with_processes_and_no_delegation_is_refused_with_the_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = v2_dir(tmp_path / "cg", root=True, subtree="memory pids")
    v2_dir(root / "user.slice", subtree="pids")
    v2_dir(root / "user.slice" / "session-1.scope")
    support = probe(root, proc_self(tmp_path, "0::/user.slice/session-1.scope\n"))
    assert not support.ok and support.version is None
    assert "holds processes" in support.reason and "\n" not in support.reason
    with caplog.at_level(logging.WARNING, logger="ember"):
        assert MachineCgroup.create("m1", 1, 200, support) is None
    assert "runs without resource limits" in caplog.text
    assert not (root / "user.slice" / "ember").exists()


def test_v2_top_of_a_cgroup_namespace_is_not_the_root(tmp_path: Path) -> None:
    root = v2_dir(tmp_path / "cg", root=False)  # a container's "/": has cgroup.type
    support = probe(root, proc_self(tmp_path, "0::/\n"))
    assert not support.ok and "namespace" in support.reason


# -- cgroup v1 (and hybrid) ------------------------------------------------------------


def test_v1_fallback_when_v2_has_no_controllers(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    v1_tree(root)
    me = proc_self(tmp_path, "4:memory:/sandbox\n1:cpu,cpuacct:/\n0::/\n")
    support = probe(root, me)
    assert support.version == 1
    assert support.dirs == {"cpu": root / "cpu" / "ember",
                            "memory": root / "memory" / "sandbox" / "ember"}

    cg = MachineCgroup.create("m1", 1.5, 400, support)
    assert cg is not None
    cpu, mem = cg.dirs["cpu"], cg.dirs["memory"]
    assert cg.paths == (cpu, mem) and cg.path == mem
    assert (cpu / "cpu.cfs_period_us").read_text() == str(CPU_PERIOD_US)
    assert (cpu / "cpu.cfs_quota_us").read_text() == str(150_000)
    assert (mem / "memory.limit_in_bytes").read_text() == str(400 << 20)
    assert cg.limits()["cpus"] == 1.5 and cg.limits()["memory_max_bytes"] == 400 << 20
    cg.add(77)
    assert (cpu / "cgroup.procs").read_text() == (mem / "cgroup.procs").read_text() == "77"


def test_v1_bind_mounted_hierarchy_resolves_through_mountinfo(tmp_path: Path) -> None:
    # Docker without a cgroup namespace: /proc/self/cgroup names /docker/abc, and
    # the memory mount shows only that subtree.
    root = tmp_path / "cg"
    put(root / "memory" / "memory.limit_in_bytes", "1")
    mountinfo = f"35 31 0:32 /docker/abc {root / 'memory'} rw - cgroup cgroup rw,memory\n"
    support = probe(root, proc_self(tmp_path, "4:memory:/docker/abc\n", mountinfo))
    assert support.version == 1 and support.dirs == {"memory": root / "memory" / "ember"}
    assert support.controllers == ("memory",)


def test_read_only_cgroup_mount_is_reported_and_nothing_is_created(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cg"
    v1_tree(root)
    real_access = os.access

    def read_only(path: object, mode: int, **kw: object) -> bool:
        if mode & os.W_OK and str(path).startswith(str(root)):
            return False  # what access(2) says on a read-only mount (EROFS)
        return real_access(path, mode)  # type: ignore[arg-type]
    monkeypatch.setattr(os, "access", read_only)
    support = probe(root, proc_self(tmp_path, "4:memory:/sandbox\n1:cpu:/\n0::/\n"))
    assert not support.ok
    assert "not writable" in support.reason and "\n" not in support.reason
    assert MachineCgroup.create("m1", 1, 200, support) is None
    assert not list(root.rglob("ember"))


def test_no_cgroup_filesystem_at_all(tmp_path: Path) -> None:
    support = probe(tmp_path / "nothing", proc_self(tmp_path, ""))
    assert not support.ok and support.reason


# -- lifecycle ---------------------------------------------------------------------------


def test_find_reattaches_by_name_and_remove_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    v1_tree(root)
    support = probe(root, proc_self(tmp_path, "4:memory:/sandbox\n1:cpu:/\n0::/\n"))
    made = MachineCgroup.create("m1", 1, 200, support)
    assert made is not None
    found = MachineCgroup.find("m1", support)  # a restarted daemon
    assert found is not None and found.paths == made.paths and found.version == 1
    assert MachineCgroup.find("m2", support) is None
    found.remove()
    assert not any(p.exists() for p in made.paths)
    made.remove()  # again: nothing left, no error
    assert MachineCgroup.find("m1", support) is None


def test_remove_kills_what_is_left_and_waits_for_it(tmp_path: Path) -> None:
    root = v2_dir(tmp_path / "cg", root=True)
    cg = MachineCgroup.create("m1", 1, 200, probe(root, proc_self(tmp_path, "0::/\n")))
    assert cg is not None
    straggler = subprocess.Popen(["sleep", "60"])
    try:
        cg.add(straggler.pid)
        cg.remove(timeout=5)
        assert not cg.path.exists()
        assert straggler.wait(5) == -9
    finally:
        straggler.kill()
        straggler.wait()


def test_a_leftover_cgroup_of_the_same_name_is_replaced_unless_in_use(tmp_path: Path) -> None:
    root = v2_dir(tmp_path / "cg", root=True)
    support = probe(root, proc_self(tmp_path, "0::/\n"))
    put(root / "ember" / "m1" / "memory.max", "1")  # empty leftover of an earlier run
    cg = MachineCgroup.create("m1", 1, 200, support)
    assert cg is not None and (cg.path / "memory.max").read_text() == str(200 << 20)
    holder = subprocess.Popen(["sleep", "60"])
    try:
        cg.add(holder.pid)  # a live machine still uses that name
        assert MachineCgroup.create("m1", 1, 200, support) is None
        assert MachineCgroup.find("m1", support) is not None  # and it was not touched
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "cgroup.procs", "memory.max",
                                  "x" * 200])
def test_names_that_cannot_name_a_cgroup_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(HostError, match="invalid machine name"):
        MachineCgroup.create(name, 1, 200, probe(tmp_path, proc_self(tmp_path, "")))


# -- how QEMU uses it ------------------------------------------------------------------


def _spec(memory_mib: int, accel: str, **kw: object) -> MachineSpec:
    return MachineSpec(name="m", state_dir=Path("/x"), kernel=Path("/k"), initramfs=Path("/i"),
                       cmdline="", memory_mib=memory_mib, accel=accel, **kw)  # type: ignore[arg-type]


def test_memory_limit_covers_guest_ram_qemu_and_the_translation_cache() -> None:
    # The documented limit (docs/architecture.md): guest RAM + 64 MiB + RAM/128,
    # +128 MiB for TCG's translation cache; pinned here, not derived from src.
    assert memory_limit_mib(_spec(256, "kvm")) == 256 + 64 + 2
    assert memory_limit_mib(_spec(1024, "kvm")) == 1024 + 64 + 8
    assert memory_limit_mib(_spec(256, "tcg")) == 256 + 64 + 2 + 128
    assert memory_limit_mib(_spec(1024, "tcg")) == 1024 + 64 + 8 + 128
    assert (QEMU_BASE_OVERHEAD_MIB, TCG_TB_SIZE_MIB) == (64, 128)


def test_limit_resources_round_trips_through_spec_json_and_defaults_off() -> None:
    spec = _spec(256, "tcg", limit_resources=True)
    assert MachineSpec.from_json(spec.to_json()).limit_resources is True
    old = {k: v for k, v in _spec(256, "tcg").to_json().items() if k != "limit_resources"}
    assert MachineSpec.from_json(old).limit_resources is False


def test_the_child_joins_its_cgroup_before_exec() -> None:
    # cgroup.procs stands in as a pipe: the child writes "0" (itself) between
    # fork and exec, so QEMU never runs outside its cgroup.
    r, w = os.pipe()
    try:
        preexec = _cgroup_join([w])
        assert preexec is not None
        subprocess.run(["true"], preexec_fn=preexec, check=True)
        os.close(w)
        w = -1
        assert os.read(r, 16) == b"0"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert _cgroup_join([]) is None
