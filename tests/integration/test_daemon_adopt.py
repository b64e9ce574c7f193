"""Re-adoption of a paused machine by a restarted daemon (docs/architecture.md, Re-adoption)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from daemon_api import create, delete, get, run, start, wait_for

from ember.host.cgroup import probe
from ember.vmm.qmp import QMPClient
from ember.vmm.spec import MachineSpec

if TYPE_CHECKING:
    from conftest import Daemon


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.http() as c:
        yield c


def qemu_status(state_dir: Path) -> Any:
    """QEMU's own word on whether the vCPUs run (QMP ``query-status``)."""
    fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:  # a short socket path, however deep the state directory
        with QMPClient.connect(f"/proc/self/fd/{fd}/{MachineSpec.QMP_SOCKET}") as q:
            return q.execute("query-status")
    finally:
        os.close(fd)


def test_a_paused_machine_is_readopted_paused(api: httpx.Client, daemon: Daemon) -> None:
    m = create(api, name="napper", cmd=["sh", "-c", "while :; do echo tick; sleep 0.2; done"])
    state_dir = daemon.home / "machines" / "daemon" / m["id"] / "napper"
    console = state_dir / MachineSpec.CONSOLE_LOG
    try:
        before = start(api, "napper")
        assert run(api, "napper", "sh", "-c", "echo before-restart > /dev/console",
                   user="root")["exit_code"] == 0
        wait_for("the console line", lambda: b"before-restart" in console.read_bytes())
        assert api.post("/v1/machines/napper/pause").json()["state"] == "paused"
        assert qemu_status(state_dir)["status"] == "paused"

        daemon.stop()  # the machine stays, paused, without a daemon
        daemon.start()
        with daemon.http() as c:
            after = get(c, "napper")
            assert after["state"] == "paused" and after["pid"] == before["pid"]
            assert qemu_status(state_dir)["status"] == "paused"  # not resumed behind our back
            r = c.post("/v1/machines/napper/exec", json={"cmd": ["true"]})
            assert r.status_code == 409 and "paused" in r.json()["error"]["message"]
            if probe().ok:  # the new daemon found the machine's cgroup again
                assert after["limits"] == before["limits"] and after["limits"]["cgroup"]
                cgroup = Path(after["limits"]["cgroup"])
                assert str(before["pid"]) in (cgroup / "cgroup.procs").read_text().split()

            assert c.post("/v1/machines/napper/resume").json()["state"] == "running"
            assert qemu_status(state_dir)["status"] == "running"
            assert run(c, "napper", "echo", "after")["stdout"] == "after\n"
            # The console is recorded again, after what was recorded before. (What the
            # guest prints before QEMU's console reconnects, within a second, is lost:
            # written until it shows.)
            def console_shows_a_new_line() -> bool:
                run(c, "napper", "sh", "-c", "echo after-restart > /dev/console", user="root")
                return b"after-restart" in console.read_bytes()

            wait_for("the console to be recorded again", console_shows_a_new_line)
            text = c.get("/v1/machines/napper/logs", params={"source": "console"}).content
            assert text.index(b"before-restart") < text.index(b"after-restart")
            # the main process is followed again: its output goes on
            ticks = c.get("/v1/machines/napper/logs").text.count("tick")
            wait_for("more ticks", lambda: c.get("/v1/machines/napper/logs").text.count(
                "tick") > ticks + 2)
            # and the machine stops as its own: QEMU gone, its cgroup removed with it
            stopped = c.post("/v1/machines/napper/stop", params={"timeout": 5}).json()
            assert stopped["state"] == "stopped" and stopped["exit_code"] == 143
            if probe().ok:
                assert not cgroup.exists()
    finally:
        with daemon.http() as c:
            delete(c, "napper")
