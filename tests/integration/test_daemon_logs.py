"""A daemon machine's output log: capped at 2 x 1 MiB, and followed across its rotation."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest
from daemon_api import create, delete, get, run, start, wait_for

if TYPE_CHECKING:
    from conftest import Daemon

MIB = 1 << 20


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.http() as c:
        yield c


def test_the_output_log_keeps_the_newest_2_mib(api: httpx.Client, daemon: Daemon) -> None:
    # seq 1 600000 prints about 4 MiB: the log keeps the newest ~2 MiB of it
    m = create(api, name="chatty", cmd=["seq", "1", "600000"], network="none")
    try:
        start(api, "chatty")
        wait_for("chatty to stop", lambda: get(api, "chatty")["state"] == "stopped",
                 timeout=300)
        assert get(api, "chatty")["exit_code"] == 0
        text = api.get("/v1/machines/chatty/logs").text
        assert MIB < len(text) <= 2 * MIB
        assert text.endswith("\n599999\n600000\n")
        # what is kept is the end of the output, whole from its first full line on
        lines = text.split("\n")[1:-1]
        first = int(lines[0])
        assert lines == [str(i) for i in range(first, 600001)]
        # on disk: two files of at most 1 MiB each and their arrival-time indexes (16 bytes
        # per write at most), nothing more
        root = daemon.home / "machines" / "daemon" / m["id"]
        logs = sorted(p.name for p in root.iterdir() if p.name.startswith("output.log"))
        assert logs == ["output.log", "output.log.1", "output.log.1.idx", "output.log.idx"]
        assert all((root / n).stat().st_size <= MIB for n in logs)
        assert api.get("/v1/machines/chatty/logs", params={"tail": 2}).text == "599999\n600000\n"
    finally:
        delete(api, "chatty")


@pytest.mark.timeout(300)
def test_logs_follow_sees_every_line_across_a_rotation(api: httpx.Client,
                                                       daemon: Daemon) -> None:
    # 1500 numbered lines of 1000 bytes (~1.4 MiB: one rotation), written at a
    # pace a follower keeps up with, once the test says go.
    lines = 1500
    writer = ('echo ready; until [ -e /tmp/go ]; do sleep 0.05; done; i=0; '
              f'while [ $i -lt {lines} ]; do printf "%05d %0993d\\n" $i 0; i=$((i+1)); '
              '[ $((i % 20)) -eq 0 ] && sleep 0.05; done')
    m = create(api, name="rotor", cmd=["sh", "-c", writer], network="none")
    follower = None
    try:
        start(api, "rotor")
        follower = subprocess.Popen([sys.executable, "-m", "ember", "logs", "-f", "rotor"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, env=os.environ.copy())
        assert follower.stdout is not None
        assert follower.stdout.readline() == b"ready\n"  # following: now write
        assert run(api, "rotor", "touch", "/tmp/go")["exit_code"] == 0
        out, err = follower.communicate(timeout=240)  # ends when the machine stops
        assert follower.returncode == 0, err
        got = out.decode().splitlines()
        want = [f"{i:05d} {0:0993d}" for i in range(lines)]
        if got != want:
            wrong = next(i for i, (a, b) in enumerate(itertools.zip_longest(got, want))
                         if a != b)
            pytest.fail(f"{len(got)} lines of {lines}; the first wrong one is line {wrong}: "
                        f"{got[wrong][:12] if wrong < len(got) else None!r}")
        # the log did rotate meanwhile
        assert (daemon.home / "machines" / "daemon" / m["id"] / "output.log.1").is_file()
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.wait()
        delete(api, "rotor")
