"""Docker's conventions, as a user of the CLI relies on them, against the real daemon.

kill and its exit code, signals to the main process, wait, rename, restart,
--rm, logs --since/--timestamps, ps -q/--filter/--format, inspect's array,
short id prefixes, what a failed `run -d` leaves (nothing), low ports for
non-root users, the kernel's console.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

import ember.machine as machine_module
from ember import paths
from ember.errors import MachineCrashed
from ember.host.probe import choose_accel
from ember.machine import Machine, MachineConfig
from ember.vmm.spec import MachineSpec

if TYPE_CHECKING:
    from conftest import Daemon

    from ember.guest.bundle import GuestBundle
    from ember.images import ImageStore


def ember(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ember", *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=timeout,
                          env=os.environ.copy())


def ok(*args: str) -> str:
    proc = ember(*args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def fails(*args: str) -> str:
    """The one line of a failing command (exit 125)."""
    proc = ember(*args)
    assert proc.returncode == 125, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ember: error: "), proc.stderr
    return lines[0]


def inspect(name: str) -> dict[str, object]:
    (record,) = json.loads(ok("inspect", name))
    return record


def until(check: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def idle(daemon: Daemon) -> Iterator[str]:
    """A running machine whose main process logs a line per second (for logs tests)."""
    name = ok("run", "-d", "--name", "conv-idle", "-p", "80", "sample:latest", "--",
              "sh", "-c", "i=0; while :; do i=$((i+1)); echo tick $i; sleep 1; done").strip()
    yield name
    ember("rm", "-f", name)


def test_kill_powers_off_with_137_and_unpublishes_ports(daemon: Daemon) -> None:
    name = ok("run", "-d", "--name", "conv-kill", "-p", "80", "sample:latest", "--",
              "sleep", "600").strip()
    running = inspect(name)
    assert running["ports"] and running["limits"].get("cgroup")  # type: ignore[union-attr]
    assert ok("kill", name).strip() == name
    m = inspect(name)
    assert (m["state"], m["exit_code"], m["reason"]) == ("stopped", 137, "killed by request")
    # published only while it runs: ps -a and port show none, the request is kept
    assert m["ports"] == [] and [p["guest_port"] for p in m["publish"]] == [80]  # type: ignore
    assert "cgroup" not in m["limits"] and m["limits"]  # type: ignore[operator]
    assert ok("port", name) == ""
    assert "is stopped" in fails("port", name, "80")
    # Docker's choices: stop of a stopped machine is fine, kill of one is not
    assert ok("stop", name).strip() == name
    assert "kill needs it running or paused" in fails("kill", name)
    ok("rm", name)


def test_kill_with_a_signal_goes_to_the_main_process(daemon: Daemon) -> None:
    name = ok("run", "-d", "--name", "conv-sig", "sample:latest", "--", "sh", "-c",
              "trap 'echo got TERM; exit 3' TERM; while :; do sleep 0.2; done").strip()
    assert ok("kill", "-s", "TERM", name).strip() == name
    assert ok("wait", name).strip() == "3"  # `ember wait` prints the exit code
    m = inspect(name)
    assert (m["state"], m["exit_code"]) == ("stopped", 3)
    assert "got TERM" in ok("logs", name)
    ok("rm", name)


def test_wait_blocks_until_the_main_process_ends(daemon: Daemon) -> None:
    name = ok("create", "--name", "conv-wait", "sample:latest", "--", "sh", "-c",
              "while [ ! -e /tmp/go ]; do sleep 0.1; done; exit 7").strip()
    assert ok("wait", name).strip() == "0"  # created, never run: nothing to wait for
    ok("start", name)
    waiter = subprocess.Popen([sys.executable, "-m", "ember", "wait", name],
                              stdout=subprocess.PIPE, text=True)
    try:
        # the exit code is only known once the main process has gone: 7 proves the wait
        ok("exec", name, "--", "touch", "/tmp/go")
        out, _ = waiter.communicate(timeout=60)
    finally:
        waiter.kill()
    assert (waiter.returncode, out.strip()) == (0, "7")
    ok("rm", name)


def test_start_of_a_running_machine_is_a_no_op(idle: str) -> None:
    before = inspect(idle)
    assert ok("start", idle).strip() == idle
    after = inspect(idle)
    assert (after["state"], after["pid"], after["started_at"]) == \
        ("running", before["pid"], before["started_at"])


def test_rename_keeps_the_machine_and_frees_the_name(daemon: Daemon) -> None:
    ok("run", "-d", "--name", "conv-old", "sample:latest", "--", "sleep", "600")
    pid = inspect("conv-old")["pid"]
    ok("rename", "conv-old", "conv-new")
    assert "no machine named 'conv-old'" in fails("inspect", "conv-old")
    m = inspect("conv-new")
    assert (m["state"], m["pid"], m["hostname"]) == ("running", pid, "conv-old")
    assert ok("exec", "conv-new", "--", "echo", "still here") == "still here\n"
    ok("run", "-d", "--name", "conv-old", "sample:latest", "--", "sleep", "600")
    assert "exists already" in fails("rename", "conv-new", "conv-old")
    assert "should match pattern" in fails("rename", "conv-new", "no/slash")
    # the renamed machine stops and boots again under its new name
    ok("restart", "-t", "1", "conv-new")
    assert inspect("conv-new")["state"] == "running"
    assert inspect("conv-new")["pid"] != pid
    ok("rm", "-f", "conv-new", "conv-old")


def test_run_rm_removes_the_machine_when_it_stops(daemon: Daemon) -> None:
    name = ok("run", "-d", "--rm", "--name", "conv-rm", "sample:latest", "--",
              "sh", "-c", "sleep 600").strip()
    assert inspect(name)["auto_remove"] is True
    ok("restart", "-t", "1", name)  # a restart is not an end
    assert inspect(name)["state"] == "running"
    ok("stop", "-t", "1", name)
    assert "no machine named" in fails("inspect", name)
    name = ok("run", "-d", "--rm", "sample:latest", "--", "true").strip()
    until(lambda: ember("inspect", name).returncode != 0, "the machine to be removed")


def test_logs_since_and_timestamps(idle: str) -> None:
    until(lambda: "tick 3" in ok("logs", idle), "three ticks")
    stamped = ok("logs", "-t", idle).splitlines()
    first = stamped[0]
    assert first.endswith(" tick 1") and first[:4] == time.strftime("%Y", time.gmtime())
    stamp = first.split(" ", 1)[0]
    assert stamp.endswith("Z") and "T" in stamp and len(stamp) == len("2026-12-01T08:00:00.") + 10
    # --since: a time between two lines keeps only the later ones
    from datetime import datetime

    times = [datetime.fromisoformat(line.split(" ", 1)[0][:26] + "+00:00")
             for line in stamped]
    cut = times[1].timestamp() + 0.001
    later = ok("logs", "--since", f"{cut:.6f}", idle).splitlines()
    assert later and later[0] == stamped[2].split(" ", 1)[1]
    assert ok("logs", "--since", "1h", idle).splitlines()[0] == "tick 1"
    assert "is not a time" in fails("logs", "--since", "yesterday", idle)
    assert "for source=output" in fails("logs", "--console", "-t", idle)


def test_ps_quiet_filter_and_format(idle: str, daemon: Daemon) -> None:
    machine_id = str(inspect(idle)["id"])
    ok("create", "--name", "conv-ps", "sample:latest", "--", "true")
    try:
        quiet = ok("ps", "-q").split()
        assert machine_id[:12] in quiet and all(len(x) == 12 for x in quiet)
        assert ok("ps", "-a", "-q", "--filter", "name=conv-ps").split() != []
        assert ok("ps", "--filter", "status=created", "--filter", "name=conv-",
                  "--format", "{{.Names}}").split() == ["conv-ps"]
        assert ok("ps", "-a", "--filter", "name=conv-", "--filter", "status=running",
                  "--format", "{{.Names}} {{.State}}").splitlines() == [f"{idle} running"]
        table = ok("ps", "--format", "table {{.Names}}\\t{{.ID}}").splitlines()
        assert table[0].split() == ["NAMES", "ID"] and f"{idle}\t{machine_id[:12]}" in table
        (line,) = ok("ps", "--format", "json", "--filter", f"id={machine_id[:5]}").splitlines()
        assert json.loads(line)["name"] == idle
        assert "unknown field .Nope" in fails("ps", "--format", "{{.Nope}}")
        assert "expected KEY=VALUE" in fails("ps", "--filter", "colour=red")
    finally:
        ember("rm", "-f", "conv-ps")


def test_inspect_is_an_array_and_short_id_prefixes_work(idle: str) -> None:
    machine_id = str(inspect(idle)["id"])
    for prefix in (machine_id[:1], machine_id[:3], machine_id):
        proc = ember("inspect", prefix)
        if proc.returncode == 0:
            (m,) = json.loads(proc.stdout)
            # a machine named exactly the prefix wins over id prefixes, as in Docker
            assert m["id"] == machine_id or m["name"] == prefix
        else:  # a one-character prefix may be shared with another machine: then it says so
            assert "ambiguous" in proc.stderr and len(prefix) < 12
    both = json.loads(ok("inspect", idle, machine_id[:8]))
    assert [m["id"] for m in both] == [machine_id, machine_id]


def test_a_failed_run_d_leaves_nothing_behind(daemon: Daemon) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = fails("run", "-d", "--name", "conv-fail", "-p", f"{port}:80", "sample:latest",
                     "--", "sleep", "600")
    assert f"127.0.0.1:{port}" in line and "in use" in line and "removed" in line
    assert "no machine named" in fails("inspect", "conv-fail")
    # the name is free again
    ok("run", "-d", "--name", "conv-fail", "sample:latest", "--", "sleep", "600")
    ok("rm", "-f", "conv-fail")


def test_a_non_root_user_serves_on_port_80(daemon: Daemon) -> None:
    name = ok("run", "-d", "--name", "conv-low", "-u", "1000", "-p", "80", "sample:latest",
              "--", "httpd", "-f", "-p", "80", "-h", "/app").strip()
    try:
        (port,) = json.loads(ok("port", name, "--json"))

        def serves() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port["host_port"]), timeout=5) as s:
                    s.sendall(b"GET /hello.sh HTTP/1.0\r\n\r\n")
                    return b"200 OK" in s.recv(200)
            except OSError:
                return False
        until(serves, "httpd as uid 1000 to answer on port 80")
        assert ok("exec", name, "--", "id", "-u") == "1000\n"
    finally:
        ember("rm", "-f", name)


def test_the_console_log_holds_the_kernels_boot_messages(idle: str) -> None:
    console = ok("logs", "--console", idle)
    assert "Linux version" in console and "Kernel command line:" in console


def test_foreground_run_passes_sigterm_to_the_command(daemon: Daemon) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember", "run", "-q", "--name", "conv-fg", "sample:latest",
         "--", "sh", "-c", "trap 'echo caught TERM; exit 5' TERM; echo ready; "
         "while :; do sleep 0.1; done"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        # the name is taken while it runs
        assert "is running" in fails("run", "-q", "--name", "conv-fg", "sample:latest", "true")
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, out) == (5, "caught TERM\n"), err


def test_a_boot_that_hangs_says_what_it_waits_for_then_fails_with_the_console(
        store: ImageStore, guest: GuestBundle) -> None:
    """A guest that stops answering mid-boot (its QEMU frozen with SIGSTOP once the kernel
    has printed): one progress line naming what the boot waits for, then one error
    carrying the console's last lines."""
    heard: list[str] = []
    m = Machine.create(machines_dir=paths.machines_dir(), guest=guest,
                       rootfs=store.rootfs(store.resolve("sample:latest")),
                       accel=choose_accel(None), config=MachineConfig())
    errors: list[BaseException] = []

    def boot() -> None:
        try:
            m.start(boot_timeout=8.0, progress=heard.append)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    old = machine_module.SLOW_BOOT
    machine_module.SLOW_BOOT = 3.0
    t = threading.Thread(target=boot)
    t.start()
    try:
        console = m.spec.path(MachineSpec.CONSOLE_LOG)
        until(lambda: console.exists() and b"Linux version" in console.read_bytes(),
              "the kernel's first message")
        assert m.vm is not None
        os.kill(m.vm.pid, signal.SIGSTOP)
        t.join(60)
    finally:
        machine_module.SLOW_BOOT = old
        m.kill()
        m.close()
    (exc,) = errors
    assert isinstance(exc, MachineCrashed)
    assert "did not answer within 8 s" in str(exc) and str(exc).count("did not answer") == 1
    assert exc.console_tail.strip()  # what the kernel printed before it froze
    (note,) = heard
    assert "still waiting for the guest agent to answer after 3 s" in note
    assert "console" in note


def test_errors_name_what_to_type(daemon: Daemon) -> None:
    name = ok("create", "--name", "conv-msg", "sample:latest", "--", "sleep", "600").strip()
    try:
        assert "copying files into it needs it running" in fails("cp", "/etc/hostname",
                                                                 f"{name}:/tmp/")
        assert "copying files from it needs it running" in fails("cp", f"{name}:/etc/hosts",
                                                                 "-")
        ok("start", name)
        assert f"ember rm -f {name}" in fails("rm", name)
    finally:
        ember("rm", "-f", name)


def test_stop_during_a_restart_backoff_stops_it_for_good(daemon: Daemon) -> None:
    import ember

    with ember.Client() as client:
        events = client.events()
        m = client.machines.create("sample:latest", name="conv-backoff", restart="on-failure",
                                   cmd=["sh", "-c", "exit 1"], start=False)
        m.start()
        # wait for a backoff long enough to stop in (0.1 s doubling: 0.8 s is the 4th)
        for ev in events:
            if ev.machine == "conv-backoff" and ev.type == "restarting" and \
                    float(str(ev.detail).split()[1]) >= 0.8:
                break
        info = m.stop(timeout=1)
        assert (info.state.value, info.reason) == ("stopped", "stopped by request")
        count = info.restart_count
        # no boot comes after it: its next events are the ones the stop and rm cause
        m.remove()
        seen = []
        for ev in events:
            if ev.machine == "conv-backoff":
                seen.append(ev.type)
                if ev.type == "deleted":
                    break
        assert seen == ["stopped", "deleted"] and count >= 4
