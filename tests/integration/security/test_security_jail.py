"""The VMM's jail, inspected from the host the way Firecracker's security suite does it.

For a daemon machine and an ``ember run`` machine alike: QEMU's uid, its
capabilities, no_new_privs, seccomp on every thread, its namespaces, its root
(what of the host's files it can see), its descriptors and rlimits; and a
forbidden syscall kills it, the daemon reports that machine crashed, and other
machines go on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_api import create, delete, get, run, start, wait_for

from ember import paths
from ember.host import jail

pytestmark = [pytest.mark.security,
              pytest.mark.skipif(os.geteuid() != 0, reason="the full jail needs root")]


def status(pid: int, task: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/task/{task}/status" if task else f"/proc/{pid}/status"
    with open(path) as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


@pytest.fixture(scope="module")
def api(daemon: Any) -> Iterator[Any]:
    with daemon.http() as c:
        yield c


@pytest.fixture(scope="module")
def daemon_vm(api: Any) -> Iterator[dict[str, Any]]:
    create(api, name="jailed", cmd=["sleep", "3600"])
    m = start(api, "jailed")
    yield m
    delete(api, "jailed")


@pytest.fixture(scope="module")
def run_vm() -> Iterator[int]:
    """The QEMU pid of an ``ember run`` (not the daemon's) that runs until the module ends."""
    machines = paths.machines_dir()
    before = set(os.listdir(machines)) if machines.exists() else set()
    proc = subprocess.Popen([sys.executable, "-m", "ember.cli", "run", "-q", "sample", "--",
                             "sh", "-c", "echo started; sleep 600"],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n"
        (name,) = set(os.listdir(machines)) - before
        yield int((machines / name / "qemu.pid").read_text())
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(params=["daemon", "run"])
def qemu_pid(request: pytest.FixtureRequest) -> int:
    if request.param == "daemon":
        return int(request.getfixturevalue("daemon_vm")["pid"])
    return int(request.getfixturevalue("run_vm"))


def test_qemu_is_qemu_and_runs_as_an_unprivileged_uid_of_its_own(qemu_pid: int,
                                                                  daemon_vm: Any) -> None:
    assert Path(f"/proc/{qemu_pid}/exe").resolve().name.startswith("qemu-system")
    st = status(qemu_pid)
    uids = {int(x) for x in st["Uid"].split()}
    gids = {int(x) for x in st["Gid"].split()}
    (uid,) = uids
    assert jail.JAIL_UID_BASE <= uid < jail.JAIL_UID_BASE + jail.SLOTS
    assert gids == {uid}
    # a clone gets CLONE_GID (for its snapshot's memory file), nothing else; no kvm under TCG
    assert set(st["Groups"].split()) <= {str(jail.CLONE_GID)}
    # two machines never share a uid
    assert int(status(int(daemon_vm["pid"]))["Uid"].split()[0]) != uid or \
        qemu_pid == int(daemon_vm["pid"])


def test_qemu_has_no_capabilities_no_new_privs_and_seccomp_on_every_thread(
        qemu_pid: int) -> None:
    st = status(qemu_pid)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[cap], 16) == 0, cap
    assert st["NoNewPrivs"] == "1"
    tasks = os.listdir(f"/proc/{qemu_pid}/task")
    assert len(tasks) > 1  # vCPU, RCU, I/O threads: all of them filtered
    for t in tasks:
        assert status(qemu_pid, int(t))["Seccomp"] == "2", t


def test_qemu_has_its_own_namespaces_and_an_empty_environment(qemu_pid: int) -> None:
    for ns in ("mnt", "pid", "ipc", "uts"):
        assert os.readlink(f"/proc/{qemu_pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    env = Path(f"/proc/{qemu_pid}/environ").read_bytes().split(b"\0")
    # nothing of Ember's environment; bubblewrap sets only PWD, after --chdir
    assert {e.split(b"=")[0] for e in env if e} <= {b"PWD"}, env
    # in its PID namespace, bubblewrap's init is 1 and QEMU 2: it sees no host process
    assert status(qemu_pid)["NSpid"].split()[-1] == "2"


def test_qemu_root_holds_only_what_it_needs(qemu_pid: int) -> None:
    root = Path(f"/proc/{qemu_pid}/root")
    assert os.stat(root).st_ino != os.stat("/").st_ino or \
        os.stat(root).st_dev != os.stat("/").st_dev
    state = Path(os.readlink(f"/proc/{qemu_pid}/cwd"))
    top = set(os.listdir(root))
    assert top <= {"usr", "lib", "lib64", "bin", "sbin", "dev", "proc", "etc", "tmp", "run",
                   "root", "home", "var"}, top
    assert not (root / "etc/shadow").exists()
    # /etc only on slirp, for the resolver libslirp reads late; a tap network needs none
    etc = set(os.listdir(root / "etc")) if (root / "etc").exists() else set()
    assert etc <= {"resolv.conf", "hosts"}
    # bubblewrap's minimal /dev; /dev/kvm only under KVM, never a disk or /dev/net/tun
    assert set(os.listdir(root / "dev")) <= {
        "console", "core", "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr",
        "stdin", "stdout", "tty", "urandom", "zero", "kvm"}
    # of its state directory, only vmm/ (its sockets): not the spec Ember trusts
    assert sorted(os.listdir(root / state.relative_to("/"))) == ["vmm"]
    assert (state / "spec.json").exists()
    # of the data dir, nothing but what it was given: no other machine, no database
    home = paths.data_dir()
    assert not (root / home.relative_to("/") / "daemon.db").exists()
    assert not (root / home.relative_to("/") / "ember.sock").exists()
    vmm = root / state.relative_to("/") / "vmm"
    st = os.stat(vmm)
    assert st.st_uid == int(status(qemu_pid)["Uid"].split()[0]) and st.st_mode & 0o077 == 0


def test_qemu_holds_only_the_descriptors_it_needs(qemu_pid: int) -> None:
    state = Path(os.readlink(f"/proc/{qemu_pid}/cwd"))
    images = paths.data_dir() / "images"
    unexpected = []
    taps = 0
    for fd in os.listdir(f"/proc/{qemu_pid}/fd"):
        target = os.readlink(f"/proc/{qemu_pid}/fd/{fd}")
        taps += target == "/dev/net/tun"  # its tap, opened by Ember in the machine's netns
        ok = (target in ("/dev/net/tun", "/dev/null", "/dev/urandom", str(state / "qemu.log"))
              or target.startswith(("socket:", "anon_inode:", "/memfd:ember-", "pipe:"))
              or target.startswith(str(images))
              or target.startswith(str(paths.cache_dir()))
              or target.startswith(str(Path("/run/ember/slots")))
              # a daemon machine's own root layer, next to its state dir (volumes/layer.py)
              or target == str(state.parent / "rootfs.img"))
        if not ok:
            unexpected.append(target)
    assert not unexpected
    assert taps <= 1
    limits = Path(f"/proc/{qemu_pid}/limits").read_text()
    assert f"Max open files            {jail.RLIMIT_NOFILE}" in limits
    assert f"Max processes             {jail.RLIMIT_NPROC}" in limits


def test_inspect_and_doctor_report_the_confinement(api: Any, daemon_vm: Any) -> None:
    c = get(api, "jailed")["confinement"]
    assert c["mode"] == "full" and c["seccomp"] and c["no_new_privs"] and c["own_root"]
    assert c["uid"] == jail.JAIL_UID_BASE + c["slot"]
    assert int(c["capabilities"], 16) == 0
    assert {"mnt", "pid", "ipc", "uts"} <= set(c["namespaces"])
    out = subprocess.run([sys.executable, "-m", "ember.cli", "doctor"], capture_output=True,
                         text=True, check=True).stdout
    assert "jail         full:" in out


@pytest.mark.timeout(240)
def test_a_forbidden_syscall_kills_qemu_and_only_that_machine_is_crashed(
        api: Any, daemon_vm: Any) -> None:
    from ember.vmm.qmp import QMPClient

    create(api, name="victim", cmd=["sleep", "3600"])
    victim = start(api, "victim")
    try:
        state = Path(os.readlink(f"/proc/{victim['pid']}/cwd"))
        # `migrate exec:` makes QEMU fork a shell: spawn=deny answers with SIGSYS
        with QMPClient.connect(str(state / "vmm" / "qmp.sock")) as q:
            try:
                q.execute("migrate", uri="exec:cat > /dev/null")
            except Exception:  # QEMU died under the command: no answer
                pass
        m = wait_for("the victim reported crashed",
                     lambda: (m := get(api, "victim"))["state"] == "crashed" and m)
        assert f"signal {signal.SIGSYS}" in (m["reason"] or ""), m["reason"]
        # the other machine did not notice
        assert run(api, "jailed", "echo", "alive")["stdout"] == "alive\n"
    finally:
        delete(api, "victim")
