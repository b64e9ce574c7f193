"""A hostile guest floods what it can reach of the host: its serial console and its output.

For several seconds one daemon machine writes the serial console and its main
process's stdout as fast as it can, and nobody reads them. The daemon's memory
stays within a bound, the console and output logs within their caps, and
another machine answers execs all along (not a speed goal: that it is not
blocked).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_api import create, delete, get, run, start

pytestmark = pytest.mark.security

FLOOD_SECONDS = 8
#: Seconds an exec in the bystander may take while the other machine floods.
BYSTANDER_TIMEOUT = 30


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture(scope="module")
def api(daemon: Any) -> Iterator[Any]:
    with daemon.http() as c:
        yield c


@pytest.mark.timeout(240)
def test_a_guest_flooding_console_and_output_cannot_grow_the_daemon_or_block_others(
        api: Any, daemon: Any) -> None:
    assert daemon.proc is not None
    create(api, name="bystander", cmd=["sleep", "3600"])
    start(api, "bystander")
    rss_before = rss_mib(daemon.proc.pid)
    create(api, name="flooder", user="root", cmd=[
        "sh", "-c", f"(timeout {FLOOD_SECONDS} cat /dev/urandom > /dev/ttyS0) & "
                    f"timeout {FLOOD_SECONDS} cat /dev/urandom; sleep 3600"])
    try:
        flooder = start(api, "flooder")
        peak = [rss_before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak.append(rss_mib(daemon.proc.pid))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # the bystander keeps answering while the flood lasts: each exec must come back
        # within BYSTANDER_TIMEOUT, or the request fails (a liveness bound, not a speed goal)
        answered = 0
        t_end = time.monotonic() + FLOOD_SECONDS
        while time.monotonic() < t_end:
            r = api.post("/v1/machines/bystander/exec", json={"cmd": ["true"]},
                         timeout=BYSTANDER_TIMEOUT)
            assert r.status_code == 200 and r.json()["exit_code"] == 0, r.text
            answered += 1
        stop.set()
        sampler.join()
        assert answered > 0
        # the daemon's memory did not follow the flood (tens of MB went by)
        assert max(peak) - rss_before < 64, (rss_before, max(peak))
        state = Path(os.readlink(f"/proc/{flooder['pid']}/cwd"))
        console = sum(p.stat().st_size for p in state.glob("console.log*"))
        # the flood was real (the UART moves ~0.5 MB/s under TCG), and capped
        assert 256 << 10 < console <= 2 * (1 << 20) + 65536, console
        logs = api.get("/v1/machines/flooder/logs")
        assert logs.status_code == 200 and 1 << 20 <= len(logs.content) <= 4 << 20
        assert get(api, "flooder")["state"] == "running"
        # and it is still a machine like another: it answers, and goes when told
        assert run(api, "flooder", "echo", "ok")["stdout"] == "ok\n"
    finally:
        delete(api, "flooder")
        delete(api, "bystander")


# --------------------------------------------- a guest speaking garbage to the agent channel

HOSTILE_INIT = """#!/bin/busybox sh
B=/bin/busybox
$B mount -t devtmpfs dev /dev
$B mount -t sysfs sys /sys
for d in /sys/class/virtio-ports/*; do
  [ "$($B cat $d/name)" = ember.agent ] && port=/dev/$($B basename $d)
done
case "$1" in
  garbage) $B cat /dev/urandom > $port ;;
  oversized) $B printf '\\377\\377\\377\\377\\001' > $port; $B cat /dev/zero > $port ;;
  trickle) while :; do $B printf 'x' > $port; $B sleep 1; done ;;
esac
$B sleep 1000
"""


@pytest.fixture(scope="module")
def hostile_guests(tmp_path_factory: pytest.TempPathFactory, guest: Any) -> dict[str, Any]:
    """Guest bundles whose /init is a busybox script abusing the agent port, by mode."""
    import dataclasses
    import stat as st

    from ember.guest.initramfs import CpioEntry, write_cpio

    busybox = Path("/bin/busybox").read_bytes()
    out = {}
    for mode in ("garbage", "oversized", "trickle"):
        d = st.S_IFDIR | 0o755
        script = HOSTILE_INIT.replace('"$1"', mode)
        cpio = write_cpio([CpioEntry("dev", d), CpioEntry("sys", d), CpioEntry("bin", d),
                           CpioEntry("bin/busybox", st.S_IFREG | 0o755, data=busybox),
                           CpioEntry("init", st.S_IFREG | 0o755, data=script.encode())])
        path = tmp_path_factory.mktemp("hostile") / f"{mode}.cpio"
        path.write_bytes(cpio)
        out[mode] = dataclasses.replace(guest, initramfs=path)
    return out


@pytest.mark.parametrize("mode", ["garbage", "oversized", "trickle"])
@pytest.mark.timeout(120)
def test_a_guest_speaking_garbage_on_the_agent_channel_is_a_crashed_machine(
        hostile_guests: dict[str, Any], store: Any, mode: str) -> None:
    from ember import paths
    from ember.errors import MachineCrashed
    from ember.host.probe import choose_accel
    from ember.machine import Machine, MachineConfig

    m = Machine.create(machines_dir=paths.machines_dir(), guest=hostile_guests[mode],
                       rootfs=store.rootfs(store.resolve("sample:latest")),
                       accel=choose_accel(None), config=MachineConfig(network="none"))
    rss_before = rss_mib(os.getpid())
    try:
        with pytest.raises(MachineCrashed) as crashed:
            m.start(boot_timeout=15)
    finally:
        m.close()
    # it ends (the test's timeout bounds it), with a reason, and this process's memory
    # did not follow whatever the guest sent
    why = str(crashed.value).splitlines()[0]
    assert why.startswith(f"machine {m.name}: the guest "), why
    # named as what it is: the length is checked as soon as its 4 bytes are in (the
    # trickle's after 4 s), before anything is buffered
    assert "broke the agent protocol" in why, why
    assert rss_mib(os.getpid()) - rss_before < 64
