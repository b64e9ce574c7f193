"""One booted microVM, shared by these tests, driven through the library."""

from __future__ import annotations

import signal

import pytest

from ember.agent.client import ExecFailed
from ember.agent.protocol import ExecRequest
from ember.machine import Machine, MachineState, StateError

pytestmark = pytest.mark.vm

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"


def sh(script: str, **kw: object) -> ExecRequest:
    return ExecRequest(argv=["/bin/sh", "-c", script], env=[PATH], **kw)  # type: ignore[arg-type]


def test_machine_is_running_and_reports_its_guest(machine: Machine) -> None:
    assert machine.state is MachineState.RUNNING
    assert machine.ready is not None and machine.ready.kernel.startswith("6.1.")
    assert machine.vm is not None
    with machine.vm.qmp() as qmp:
        assert qmp.execute("query-status")["status"] == "running"


def test_several_processes_run_at_once_in_one_machine(machine: Machine) -> None:
    # Each process waits for a file that only the next one creates: they can
    # only all finish if they really run concurrently.
    procs = [machine.exec(sh(f"touch /tmp/go{i}; while [ ! -e /tmp/go{i + 1} ]; do "
                             f"sleep 0.05; done; echo app{i}"))
             for i in range(3)]
    last = machine.exec(sh("touch /tmp/go3; echo last"))
    assert machine.wait_process(last, timeout=60).exit_code == 0
    for i, p in enumerate(procs):
        assert machine.wait_process(p, timeout=60).exit_code == 0
        assert p.stdout == f"app{i}\n".encode()


def test_signal_reaches_a_running_process(machine: Machine) -> None:
    p = machine.exec(sh("exec sleep 100"))
    p.wait_started(timeout=30)
    p.signal(signal.SIGKILL)
    status = machine.wait_process(p, timeout=30)
    assert status.signal == signal.SIGKILL and status.exit_code == 137


def test_tty_process_sees_a_terminal_of_the_requested_size(machine: Machine) -> None:
    p = machine.exec(sh("tty; stty size", tty=True, rows=33, cols=101))
    assert machine.wait_process(p, timeout=30).exit_code == 0
    lines = p.stdout.decode().replace("\r", "").splitlines()
    assert lines[0].startswith("/dev/pts/")
    assert lines[1] == "33 101"


def test_missing_program_and_bad_cwd_fail_cleanly(machine: Machine) -> None:
    with pytest.raises(ExecFailed) as err:
        machine.wait_process(machine.exec(ExecRequest(argv=["nope"], env=[PATH])), timeout=30)
    assert err.value.code == 127
    with pytest.raises(ExecFailed) as err:
        machine.wait_process(machine.exec(sh("true", cwd="/etc/passwd")), timeout=30)
    assert err.value.code == 126 and "/etc/passwd" in err.value.message


def test_missing_working_directory_is_created_like_docker(machine: Machine) -> None:
    p = machine.exec(sh("pwd; id -u", cwd="/srv/new/app", user="1000"))
    assert machine.wait_process(p, timeout=30).exit_code == 0
    assert p.stdout == b"/srv/new/app\n1000\n"


def test_start_twice_is_a_state_error(machine: Machine) -> None:
    with pytest.raises(StateError, match="running"):
        machine.start()


def test_a_guest_flooding_its_console_cannot_fill_the_host_disk(machine: Machine) -> None:
    from ember.vmm.console import DEFAULT_CAP

    size = 2 * DEFAULT_CAP + DEFAULT_CAP // 2
    p = machine.exec(sh(f"head -c {size} /dev/zero > /dev/console; echo done"))
    assert machine.wait_process(p, timeout=120).exit_code == 0 and p.stdout == b"done\n"
    log = machine.spec.path(machine.spec.CONSOLE_LOG)
    rotated = log.with_name(log.name + ".1")
    assert rotated.exists(), "the console never reached the cap"
    assert log.stat().st_size <= DEFAULT_CAP and rotated.stat().st_size <= DEFAULT_CAP


_TAMPER = r"""
for fd in /proc/1/fd/*; do
    case "$(readlink "$fd")" in /memfd:ember-tool*) tool=$fd ;; esac
done
[ -n "$tool" ] || { echo "the agent holds no tool"; exit 2; }
printf x >> "$tool" || echo "append refused"
printf x | dd of="$tool" conv=notrunc 2>&1 | grep -q "Operation not permitted" &&
    echo "overwrite refused"
(true > "$tool") 2>&1 | grep -q "Operation not permitted" && echo "truncate refused"
sha256sum < "$tool"
"""


def test_root_in_the_guest_cannot_change_the_tool(machine: Machine) -> None:
    """The agent's memfd is sealed: what the host sent is what every copy runs.

    The image's own shell tampers (no tool process runs meanwhile, so what stops
    the writes is the seals, not the kernel's ETXTBSY for a running program).
    """
    import hashlib

    from ember.files import ensure_tool, host_busybox

    ensure_tool(machine)
    p = machine.exec(sh(_TAMPER))  # as root
    assert machine.wait_process(p, timeout=30).exit_code == 0, p.stderr
    digest = hashlib.sha256(host_busybox().read_bytes()).hexdigest()
    assert p.stdout.decode().splitlines() == [
        "append refused", "overwrite refused", "truncate refused", f"{digest}  -"]
