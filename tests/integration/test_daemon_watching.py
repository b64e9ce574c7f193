"""Watching a real daemon: ``GET /metrics`` (parses as Prometheus text, each machine's
series match its QEMU's /proc and go with the machine), ``ember stats`` against /proc,
``ember top`` (the guest's own processes) and ``ember events`` (in order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from daemon_api import create, delete, start
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from conftest import Daemon


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.http() as c:
        yield c


def scrape(api: httpx.Client) -> dict[str, list[tuple[dict[str, str], float]]]:
    resp = api.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def of(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
       machine: str) -> list[tuple[dict[str, str], float]]:
    return [(labels, v) for labels, v in samples.get(name, []) if labels.get("name") == machine]


def test_metrics_of_a_busy_machine_and_of_the_daemon(api: httpx.Client) -> None:
    # a guest burning one CPU
    create(api, name="busy", cmd=["sh", "-c", "while :; do :; done"], memory_mib=192)
    start(api, "busy")
    try:
        pid = api.get("/v1/machines/busy").json()["pid"]
        assert api.post("/v1/machines/busy/exec", json={"cmd": ["true"]}).status_code == 200
        first = scrape(api)
        time.sleep(2.0)
        second = scrape(api)
        assert of(second, "ember_machine_state", "busy")[0][0]["state"] == "running"
        cpu1 = of(first, "ember_machine_cpu_seconds_total", "busy")[0][1]
        cpu2 = of(second, "ember_machine_cpu_seconds_total", "busy")[0][1]
        assert cpu2 - cpu1 > 0.5  # about one CPU's worth over 2 s (TCG adds its own)
        mem = of(second, "ember_machine_memory_bytes", "busy")[0][1]
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))
        # the cgroup (QEMU and its threads, page cache included) or QEMU's own RSS
        assert 0.5 * rss < mem < 4 * rss + (256 << 20)
        assert of(second, "ember_machine_memory_limit_bytes", "busy")[0][1] == 192 << 20
        assert of(second, "ember_machine_restarts_total", "busy")[0][1] == 0
        assert of(second, "ember_machine_network_receive_bytes_total", "busy")[0][1] >= 0
        running = [v for labels, v in second["ember_machines"] if labels["state"] == "running"]
        assert running and running[0] >= 1
        assert second["ember_images"][0][1] >= 1 and second["ember_image_store_bytes"][0][1] > 0
        starts = [labels for labels, _v in second.get("ember_machine_start_seconds_count", [])]
        assert starts, "a start was observed"
        assert second["ember_exec_start_seconds_count"][0][1] >= 1
        reqs = second["ember_api_requests_total"]
        assert any(labels["route"] == "/v1/machines/{name}/exec" and labels["status"] == "200"
                   for labels, _v in reqs)
        assert all("sh -c" not in str(labels) for samples in second.values()
                   for labels, _v in samples)  # no command lines in labels
    finally:
        delete(api, "busy")
    gone = scrape(api)
    assert not any(of(gone, name, "busy") for name in gone)


def ember(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_stats_top_and_events_of_a_machine(api: httpx.Client) -> None:
    since = max([0, *(e["seq"] for e in map(json.loads, ember(
        "events", "--no-follow", "--json").stdout.splitlines()))])
    create(api, name="watched", cmd=["sh", "-c", "while :; do :; done"], memory_mib=160)
    start(api, "watched")
    try:
        pid = api.get("/v1/machines/watched").json()["pid"]
        out = ember("stats", "--no-stream", "--json", "watched")
        assert out.returncode == 0, out.stderr
        (row,) = json.loads(out.stdout)
        assert row["name"] == "watched" and row["memory_limit_bytes"] == 160 << 20
        assert row["cpu_percent"] > 50  # a guest burning its one vCPU
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))
        assert 0.5 * rss < row["memory_bytes"] < 4 * rss + (256 << 20)
        table = ember("stats", "--no-stream")
        assert table.stdout.splitlines()[0].split()[:3] == ["NAME", "ID", "CPU"]
        top = ember("top", "watched")
        assert top.returncode == 0, top.stderr
        lines = top.stdout.splitlines()
        assert lines[0].split()[0] == "PID"
        assert any("while :; do :; done" in x for x in lines)
        assert not any("kthreadd" in x or "memfd:ember" in x for x in lines)
        from ember.sdk import Client

        with Client(autostart=False) as c:  # the same through the SDK
            m = c.machines.get("watched")
            assert m.stats().memory_limit_bytes == 160 << 20
            assert "watched" in [s.name for s in c.stats()]
            assert any("while" in " ".join(p) for p in m.top().processes)
        assert ember("stop", "-t", "1", "watched").returncode == 0
    finally:
        delete(api, "watched")
    events = [json.loads(x) for x in ember("events", "--seq", str(since), "--no-follow",
                                           "--json", "--filter", "machine=watched"
                                           ).stdout.splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["created", "starting", "started"] and kinds[-1] == "deleted"
    assert kinds.index("stopped") > kinds.index("started")  # the stop, then the rm
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    recent = ember("events", "--since", "10m", "--no-follow", "-f", "machine=watched")
    assert [x.split()[3:5] for x in recent.stdout.splitlines()][:1] == [["watched", "created"]]
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    assert ember("events", "--since", later, "--no-follow").stdout == ""


def test_exec_detach_leaves_its_process_running(api: httpx.Client) -> None:
    create(api, name="detached", cmd=["sleep", "100000"])
    start(api, "detached")
    try:
        out = ember("exec", "-d", "detached", "--", "sh", "-c",
                    "echo noise; sleep 0.5; touch /tmp/done; exec sleep 4242")
        assert out.returncode == 0 and out.stdout == "", out.stderr
        deadline = time.monotonic() + 30
        while ember("exec", "detached", "--", "test", "-f", "/tmp/done").returncode != 0:
            assert time.monotonic() < deadline, "the detached command did not run"
            time.sleep(0.2)
        assert "sleep 4242" in ember("top", "detached").stdout  # still running
        bad = ember("exec", "-d", "detached", "--", "/no/such/program")
        assert bad.returncode == 125 and "no/such/program" in bad.stderr
    finally:
        delete(api, "detached")


def test_bash_completion_completes_machine_names(api: httpx.Client, tmp_path: Path) -> None:
    import shutil

    create(api, name="completer", cmd=["true"])
    try:
        script = ember("completion", "bash").stdout
        shim = tmp_path / "ember"  # the script calls `ember` on PATH
        shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m ember.cli \"$@\"\n")
        shim.chmod(0o755)
        bash = shutil.which("bash")
        assert bash is not None
        test = script + '\nCOMP_WORDS=(ember exec compl); COMP_CWORD=2; _ember_complete\n' \
            'printf "%s\\n" "${COMPREPLY[@]}"\n'
        out = subprocess.run([bash, "-c", test], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"})
        assert out.stdout.split() == ["completer"], out.stderr
    finally:
        delete(api, "completer")


def test_stats_see_a_guest_take_100_mib(api: httpx.Client) -> None:
    create(api, name="holder", cmd=["sleep", "100000"], memory_mib=384, tmpfs_root=True)
    start(api, "holder")
    try:
        def reading() -> dict[str, Any]:
            out = ember("stats", "--no-stream", "--json", "holder")
            assert out.returncode == 0, out.stderr
            return dict(json.loads(out.stdout)[0])

        before = reading()
        assert before["network_rx_bytes"] is not None  # the guest's eth0 counters
        # the writable layer is guest RAM
        fill = ember("exec", "-u", "root", "holder", "--", "dd", "if=/dev/zero", "of=/fill",
                     "bs=1M", "count=100")
        assert fill.returncode == 0, fill.stderr
        after = reading()
        assert after["memory_bytes"] - before["memory_bytes"] > 80 << 20
    finally:
        delete(api, "holder")
