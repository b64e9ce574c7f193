"""Restart policies on a real daemon: ``always``, ``on-failure``, the backoff and its reset.

docs/api.md: ``on-failure`` restarts after an exit code other than 0 or a crash;
``always`` after any end not asked for by stop/kill, and at daemon start for a
machine that crashed while the daemon was down. Restarts back off from 0.1 s,
doubling to 10 s, reset after 10 s of running. Everything here is read from
the daemon's event stream: ``restarting`` events announce their delay
(``in 0.4 s``), the boots that follow are ``starting`` events.

The machines of the policy tests run at once (a module fixture starts them
all), since their backoff waits add up to most of a minute.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest
from daemon_api import (
    Event,
    Events,
    alive,
    create,
    delay_of,
    delete,
    get,
    last_seq,
    run,
    stamp,
    start,
    wait_for,
)

if TYPE_CHECKING:
    from conftest import Daemon

#: How the backoff goes for quick failures: doubling from 0.1 s, capped at 10 s.
BACKOFF = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
MACHINES = {
    "rs-always0": {"cmd": ["sh", "-c", "echo run; exit 0"], "restart": "always"},
    "rs-always1": {"cmd": ["sh", "-c", "echo run; exit 1"], "restart": "always"},
    "rs-once": {"cmd": ["sh", "-c", "echo run; exit 0"], "restart": "on-failure"},
    # runs 11 s (more than the 10 s that reset the backoff) before each failure
    "rs-slow": {"cmd": ["sh", "-c", "echo run; sleep 11; exit 1"], "restart": "on-failure"},
}


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.http() as c:
        yield c


@pytest.fixture(scope="module")
def events(api: httpx.Client, daemon: Daemon) -> Iterator[Events]:
    """The machines above, all started at once; the daemon's events from before they were."""
    with Events(daemon) as ev:
        for name, body in MACHINES.items():
            create(api, name=name, network="none", **body)
        for name in MACHINES:
            start(api, name)
        yield ev
    for name in MACHINES:
        delete(api, name)


def stop(api: httpx.Client, name: str) -> None:
    r = api.post(f"/v1/machines/{name}/stop", params={"timeout": 0})
    assert r.status_code == 200, r.text


def boots_waited_their_delay(evs: list[Event]) -> None:
    """Every boot after a ``restarting`` event came no sooner than the delay it announced."""
    for r in (e for e in evs if e["type"] == "restarting"):
        boot = next((e for e in evs if e["seq"] > r["seq"] and e["type"] == "starting"), None)
        if boot is not None:
            assert stamp(boot) - stamp(r) >= delay_of(r) - 0.002, (r, boot)


def test_always_restarts_after_exit_1(api: httpx.Client, events: Events) -> None:
    evs = events.wait_for_machine("rs-always1", "started", 3)
    stop(api, "rs-always1")
    exits = [e["detail"] for e in evs if e["type"] == "exited"]
    assert exits[:2] == ["main process exited with code 1"] * 2, evs
    assert [delay_of(e) for e in evs if e["type"] == "restarting"][:2] == [0.1, 0.2]


def test_on_failure_does_not_restart_after_exit_0(api: httpx.Client, events: Events) -> None:
    evs = events.wait_for_machine("rs-once", "stopped")
    assert [e["detail"] for e in evs if e["type"] == "exited"] == \
        ["main process exited with code 0"]
    # the first restart would have come 0.1 s after the exit: wait well past that
    events.none_within("restarting", 5.0, machine="rs-once")
    events.none_within("starting", 0.1, machine="rs-once")
    m = get(api, "rs-once")
    assert m["state"] == "stopped" and m["exit_code"] == 0 and m["restart_count"] == 0
    assert api.get("/v1/machines/rs-once/logs").text == "run\n"


@pytest.mark.timeout(600)  # ten boots and 23 s of backoff: about 40 s on 2 idle cores
def test_always_restarts_after_exit_0_backing_off_to_10_s(api: httpx.Client,
                                                         events: Events) -> None:
    # Nine quick exits: delays double from 0.1 s and stay at 10 s (the tenth boot
    # comes after two 10 s waits).
    evs = events.wait_for_machine("rs-always0", "restarting", len(BACKOFF), timeout=240)
    stop(api, "rs-always0")
    assert [delay_of(e) for e in evs if e["type"] == "restarting"][:len(BACKOFF)] == BACKOFF
    assert all(e["detail"] == "main process exited with code 0"
               for e in evs if e["type"] == "exited"), evs
    boots_waited_their_delay(evs)
    m = get(api, "rs-always0")
    assert m["restart_count"] >= len(BACKOFF)
    assert api.get("/v1/machines/rs-always0/logs").text.count("run\n") >= len(BACKOFF)


def test_backoff_resets_after_10_s_of_running(api: httpx.Client, events: Events) -> None:
    # Each boot of rs-slow runs 11 s before it fails: every restart is the first
    # of a series again, 0.1 s, where quick failures would have doubled it.
    evs = events.wait_for_machine("rs-slow", "restarting", 2, timeout=180)
    stop(api, "rs-slow")
    assert [delay_of(e) for e in evs if e["type"] == "restarting"][:2] == [0.1, 0.1]
    boots_waited_their_delay(evs)


def test_always_brings_back_a_machine_that_crashed_while_the_daemon_was_down(
        api: httpx.Client, daemon: Daemon) -> None:
    create(api, name="rs-phoenix", cmd=["sleep", "3600"], restart="always", network="none")
    try:
        old = start(api, "rs-phoenix")["pid"]
        since = last_seq(api)
        daemon.stop()  # the machine keeps running without its daemon ...
        os.kill(old, signal.SIGKILL)  # ... until its QEMU dies, unwatched
        wait_for("QEMU to be gone", lambda: not alive(old))
        daemon.start()
        with daemon.http() as c, Events(daemon, "rs-phoenix", since=since) as ev:
            evs = ev.wait_for_machine("rs-phoenix", "started")
            types = [e["type"] for e in evs]
            assert types[:4] == ["crashed", "restarting", "starting", "started"], evs
            assert evs[0]["detail"] == "QEMU exited while the daemon was down"
            m = get(c, "rs-phoenix")
            assert m["state"] == "running" and m["pid"] not in (None, old)
            assert m["restart_count"] == 1
            assert run(c, "rs-phoenix", "echo", "back")["stdout"] == "back\n"
    finally:
        with daemon.http() as c:
            delete(c, "rs-phoenix")
