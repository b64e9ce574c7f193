"""Snapshots, clones and warm starts, end to end: real QEMU, real guests, the real CLI and daemon.

One template machine (a busybox httpd serving a file it wrote, plus a file in
/tmp) is snapshotted once for the module; its clones are checked for what
users rely on: the service still answers in each, files written before are
there, writes after are private, and each has its own hostname, random bytes
and a wall clock within a second of the host's. ``ember run`` is compared warm
(a clone of its shape's boot snapshot) against cold (``--cold``) over a matrix
of options. Damaged and mismatched snapshots are refused with one line, and
leave nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from daemon_api import create, delete, get, run, start, wait_for

from ember import paths
from ember.images import ImageStore

if TYPE_CHECKING:
    from conftest import Daemon

pytestmark = pytest.mark.vm

TEMPLATE = "snap-tmpl"
SERVE = ("mkdir -p /tmp/www && echo from-template > /tmp/www/index.html && "
         "echo before > /tmp/before && exec httpd -f -p 8080 -h /tmp/www")


def ember(*args: str, input: bytes | None = None, timeout: float = 180,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], input=input,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})},
                          stdin=None if input is not None else subprocess.DEVNULL)


def http_get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
        return str(r.read().decode())


def host_port(m: dict[str, Any]) -> int:
    return int(m["ports"][0]["host_port"])


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[httpx.Client]:
    with daemon.http() as c:
        yield c


@pytest.fixture(scope="module")
def template(api: httpx.Client, store: ImageStore) -> Iterator[dict[str, Any]]:
    delete(api, TEMPLATE)
    create(api, name=TEMPLATE, cmd=["sh", "-c", SERVE], ports=[{"guest_port": 8080}])
    m = start(api, TEMPLATE)
    wait_for("the template's httpd", lambda: _answers(host_port(m)))
    yield m
    delete(api, TEMPLATE)


def _answers(port: int) -> bool:
    try:
        return http_get(port) == "from-template\n"
    except OSError:
        return False


@pytest.fixture(scope="module")
def snapshot(api: httpx.Client, template: dict[str, Any]) -> Iterator[dict[str, Any]]:
    r = api.post(f"/v1/machines/{TEMPLATE}/snapshots", json={"tag": "snap-tmpl-1"})
    assert r.status_code == 201, r.text
    snap = dict(r.json())
    yield snap
    api.delete(f"/v1/snapshots/{snap['id']}", params={"force": "true"})


def test_a_snapshot_pauses_briefly_and_the_machine_goes_on(api: httpx.Client,
                                                          template: dict[str, Any],
                                                          snapshot: dict[str, Any]) -> None:
    assert snapshot["kind"] == "user" and snapshot["parent"] == TEMPLATE
    assert snapshot["tag"] == "snap-tmpl-1" and snapshot["image"] == "sample:latest"
    assert snapshot["pause_ms"] > 0  # reported (how long is bench/snapshot.py's to say)
    # sparse: the guest touched a few tens of MB of its 256 MiB
    assert 0 < snapshot["memory_allocated"] < 256 << 20
    assert snapshot["size_on_disk"] < 256 << 20
    assert get(api, TEMPLATE)["state"] == "running"
    assert http_get(host_port(template)) == "from-template\n"
    assert run(api, TEMPLATE, "cat", "/tmp/before")["stdout"] == "before\n"
    listed = api.get("/v1/snapshots").json()
    assert snapshot["id"] in [s["id"] for s in listed]
    assert api.get("/v1/snapshots/snap-tmpl-1").json()["id"] == snapshot["id"]
    assert api.get(f"/v1/snapshots/{snapshot['id'][:8]}").json()["id"] == snapshot["id"]
    r = api.post(f"/v1/machines/{TEMPLATE}/snapshots", json={"tag": "snap-tmpl-1"})
    assert r.status_code == 409 and "exists already" in r.text


def test_clones_serve_and_are_independent(api: httpx.Client, template: dict[str, Any],
                                          snapshot: dict[str, Any]) -> None:
    names = []
    try:
        for i in range(2):
            m = create(api, snapshot=snapshot["tag"], name=f"snap-clone-{i}",
                       ports=[{"guest_port": 8080}])
            names.append(m["name"])
            assert m["snapshot"] == snapshot["id"] and m["cpus"] == 1
            m = start(api, m["name"])
            # the httpd started before the snapshot answers on the clone's own port
            assert http_get(host_port(m)) == "from-template\n"
        seen: dict[str, dict[str, str]] = {}
        for name in names:
            out = run(api, name, "sh", "-c",
                      "cat /tmp/before; hostname; head -c 16 /dev/urandom | od -An -tx1; "
                      "date +%s")["stdout"].split("\n")
            assert out[0] == "before"
            assert abs(int(out[3]) - time.time()) <= 1.5, out
            seen[name] = {"hostname": out[1], "random": out[2]}
        assert seen[names[0]]["hostname"] == names[0] and seen[names[1]]["hostname"] == names[1]
        assert seen[names[0]]["random"] != seen[names[1]]["random"]
        # what a clone writes is its own: not in the other clone, not in the template
        assert run(api, names[0], "sh", "-c", "echo mine > /tmp/www/index.html")["exit_code"] == 0
        assert http_get(host_port(get(api, names[0]))) == "mine\n"
        assert http_get(host_port(get(api, names[1]))) == "from-template\n"
        assert http_get(host_port(template)) == "from-template\n"
        # a clone is a machine like any other: it stops and starts (a fresh clone again)
        r = api.post(f"/v1/machines/{names[1]}/stop", params={"timeout": 0})
        assert r.status_code == 200, r.text
        m = start(api, names[1])
        assert http_get(host_port(m)) == "from-template\n"
        # the snapshot cannot go while it has clones
        r = api.delete(f"/v1/snapshots/{snapshot['id']}")
        assert r.status_code == 409 and names[0] in r.text
        assert sorted(api.get(f"/v1/snapshots/{snapshot['id']}").json()["clones"]) == names
    finally:
        for name in names:
            delete(api, name)


def test_clone_takes_a_snapshot_and_starts_n(api: httpx.Client, template: dict[str, Any]
                                             ) -> None:
    proc = ember("clone", TEMPLATE, "-n", "2")
    assert proc.returncode == 0, proc.stderr.decode()
    names = proc.stdout.decode().split()
    try:
        assert names == [f"{TEMPLATE}-1", f"{TEMPLATE}-2"]
        for name in names:
            m = get(api, name)
            assert m["state"] == "running"
            assert http_get(host_port(m)) == "from-template\n"
        assert b"paused" in proc.stderr
        snap_id = get(api, names[0])["snapshot"]
        r = api.delete(f"/v1/snapshots/{snap_id}", params={"force": "true"})
        assert r.status_code == 204, r.text
        assert api.get(f"/v1/machines/{names[0]}").status_code == 404
    finally:
        for name in names:
            delete(api, name)


def test_bad_snapshot_requests_are_4xx(api: httpx.Client, snapshot: dict[str, Any]) -> None:
    r = api.post("/v1/machines", json={"snapshot": "no-such-snapshot"})
    assert r.status_code == 404, r.text
    r = api.post("/v1/machines", json={"snapshot": snapshot["id"], "image": "sample:latest"})
    assert r.status_code == 422, r.text
    r = api.post("/v1/machines", json={"snapshot": snapshot["id"], "memory_mib": 512})
    assert r.status_code == 422 and "shape of its snapshot" in r.text
    r = api.post(f"/v1/machines/{TEMPLATE}/clone", json={"count": 0})
    assert r.status_code == 422, r.text
    r = api.post("/v1/machines/no-such-machine/snapshots")
    assert r.status_code == 404, r.text
    with_created = create(api, name="snap-never-started")
    try:
        r = api.post(f"/v1/machines/{with_created['name']}/snapshots")
        assert r.status_code == 409 and "running or paused" in r.text
    finally:
        delete(api, with_created["name"])
    assert api.delete("/v1/snapshots/no-such-snapshot").status_code == 404


def test_run_from_a_snapshot_in_the_foreground(snapshot: dict[str, Any]) -> None:
    proc = ember("run", "-q", "--from", snapshot["tag"], "--", "sh", "-c",
                 "cat /tmp/before; cat /tmp/www/index.html; exit 3")
    assert proc.returncode == 3, proc.stderr.decode()
    assert proc.stdout == b"before\nfrom-template\n"


def test_a_snapshot_in_use_by_a_running_clone_is_not_removed(api: httpx.Client,
                                                             template: dict[str, Any]) -> None:
    r = api.post(f"/v1/machines/{TEMPLATE}/snapshots", json={"tag": "snap-inuse"})
    assert r.status_code == 201, r.text
    snap = r.json()
    clone = subprocess.Popen([sys.executable, "-m", "ember.cli", "run", "-q", "--from",
                              "snap-inuse", "--", "sh", "-c", "echo up; sleep 60"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert clone.stdout is not None
        assert clone.stdout.readline() == b"up\n"
        assert api.get("/v1/snapshots/snap-inuse").json()["in_use"] is True
        r = api.delete("/v1/snapshots/snap-inuse")
        assert r.status_code == 409 and "in use" in r.text
    finally:
        clone.send_signal(signal.SIGKILL)
        clone.wait(30)
    # QEMU died with its `ember run`: the snapshot is free again
    wait_for("the clone's QEMU to go",
             lambda: not api.get("/v1/snapshots/snap-inuse").json()["in_use"])
    assert api.delete(f"/v1/snapshots/{snap['id']}").status_code == 204


def test_a_snapshot_follows_its_main_process(api: httpx.Client) -> None:
    """A clone started without a command follows the snapshot's main process."""
    create(api, name="snap-main", cmd=["sh", "-c", "echo started; sleep 4; echo done; exit 7"])
    try:
        start(api, "snap-main")
        # once its first line reached the daemon, the clone has only the rest to say
        wait_for("the first line", lambda: b"started" in api.get(
            "/v1/machines/snap-main/logs", params={"follow": "false"}).content)
        r = api.post("/v1/machines/snap-main/snapshots", json={"tag": "snap-main-1"})
        assert r.status_code == 201, r.text
        proc = ember("run", "-q", "--from", "snap-main-1", timeout=120)
        assert proc.returncode == 7, proc.stderr.decode()
        assert proc.stdout == b"done\n"  # "started" was before the snapshot
    finally:
        delete(api, "snap-main")
        api.delete("/v1/snapshots/snap-main-1", params={"force": "true"})


# --- damaged and mismatched snapshots


def _copy_snapshot(snap_id: str, new_id: str, **changes: Any) -> Path:
    src = paths.snapshots_dir() / snap_id
    dst = paths.snapshots_dir() / new_id
    # holes kept: the snapshot holds its machine's 10 GiB sparse root layer
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst)], check=True)
    manifest = dst / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc.update({"id": new_id, "tag": "", **changes})
    manifest.chmod(0o644)
    manifest.write_text(json.dumps(doc))
    return dst


def _machines() -> set[str]:
    return set(os.listdir(paths.machines_dir())) if paths.machines_dir().exists() else set()


@pytest.mark.parametrize(("damage", "message"), [
    ({"qemu_build": "0" * 64}, "another QEMU build"),
    ({"accel": "kvm"}, "taken under kvm"),
    ({"cpu_model": "host:elsewhere"}, "another CPU model"),
    ({"memory_mib": 512, "memory_size": 512 << 20}, "memory file is"),
    ({"format": 99}, "format 99"),
    ({"cpus": "two"}, "'cpus' has the wrong type"),
    ("truncate state", "device state does not match"),
    ("corrupt state", "device state does not match"),
    ("truncate memory", "memory file is"),
    ("no manifest", "has no manifest"),
])
def test_damaged_or_mismatched_snapshots_are_refused_before_qemu(
        snapshot: dict[str, Any], damage: Any, message: str) -> None:
    new_id = f"{abs(hash(str(damage))):032x}"[-32:]
    dst = _copy_snapshot(snapshot["id"], new_id, **(damage if isinstance(damage, dict) else {}))
    try:
        if damage == "truncate state":
            os.chmod(dst / "state", 0o644)
            os.truncate(dst / "state", 100)
        elif damage == "corrupt state":
            os.chmod(dst / "state", 0o644)
            with open(dst / "state", "r+b") as f:
                f.seek(1000)
                f.write(b"\xff" * 16)
        elif damage == "truncate memory":
            os.chmod(dst / "memory", 0o644)
            os.truncate(dst / "memory", 4096)
        elif damage == "no manifest":
            (dst / "manifest.json").unlink()
        before = _machines()
        proc = ember("run", "-q", "--from", new_id, "--", "true")
        err = proc.stderr.decode().strip()
        assert proc.returncode == 125, err
        assert message in err and len(err.splitlines()) == 1, err
        assert _machines() == before  # no machine, process or file left behind
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def test_a_writer_killed_mid_snapshot_leaves_the_store_consistent(tmp_path: Path) -> None:
    """A snapshot writer SIGKILLed mid-write leaves only a temporary directory, which is
    never listed and is removed by the next writer."""
    from ember.snapshots.store import SnapshotStore

    root = tmp_path / "snapshots"
    script = ("import os, signal, sys\n"
              "from pathlib import Path\n"
              "from ember.snapshots.store import SnapshotStore\n"
              f"s = SnapshotStore(Path({str(root)!r}), 'user')\n"
              "sid, tmp, lock = s.new_tmp()\n"
              "(tmp / 'state').write_bytes(b'x' * 1000)\n"
              "(tmp / 'memory').write_bytes(b'y' * 4096)\n"
              "print(tmp, flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    tmp = Path(proc.stdout.decode().strip())
    assert tmp.exists()
    store = SnapshotStore(root, "user")
    assert store.all() == []
    _, new_tmp, lock = store.new_tmp()  # the next writer sweeps what the dead one left
    assert not tmp.exists() and new_tmp.exists()
    store.discard(new_tmp, lock)
    assert list(root.iterdir()) == [root / ".lock"] or list(root.iterdir()) == []


# --- ember run: warm by default


RUN_MATRIX: list[tuple[list[str], list[str], bytes | None]] = [
    ([], ["sh", "-c", "echo out; echo err >&2; exit 3"], None),
    (["--hostname", "fixed"], ["sh", "-c", "hostname; cat /etc/hostname"], None),
    (["-e", "A=1", "-e", "B=two words"], ["sh", "-c", "echo $A $B; env | sort | grep -v ^HOSTNAME"],
     None),
    (["-u", "1234:5678"], ["id"], None),
    (["-w", "/var/tmp"], ["pwd"], None),
    ([], ["cat"], b"stdin bytes\n" * 1000),
    ([], ["sh", "-c", "kill -TERM $$"], None),
    ([], ["no-such-program"], None),
    (["--entrypoint", ""], ["/bin/echo", "no entrypoint"], None),
]


def _warm_entry() -> None:
    """Make sure the boot snapshot of the default shape exists (a first run keeps it)."""
    proc = ember("run", "sample", "--", "true")
    assert proc.returncode == 0, proc.stderr.decode()


@pytest.mark.parametrize(("opts", "cmd", "stdin"), RUN_MATRIX)
def test_warm_and_cold_runs_are_the_same(store: ImageStore, opts: list[str], cmd: list[str],
                                         stdin: bytes | None) -> None:
    _warm_entry()
    warm = ember("run", *opts, "sample", "--", *cmd, input=stdin)
    assert b"warm start" in warm.stderr, warm.stderr.decode()
    cold = ember("run", "-q", "--cold", *opts, "sample", "--", *cmd, input=stdin)
    warm_err = b"\n".join(line for line in warm.stderr.split(b"\n")
                          if not line.startswith(b"ember: microVM "))
    assert (warm.returncode, warm.stdout, warm_err) == (cold.returncode, cold.stdout,
                                                        cold.stderr)


def test_warm_runs_have_their_own_identity(store: ImageStore) -> None:
    _warm_entry()
    outs = []
    for name in ("warm-a", "warm-b"):
        proc = ember("run", "--name", name, "sample", "--", "sh", "-c",
                     "hostname; head -c 16 /dev/urandom | od -An -tx1; date +%s")
        assert proc.returncode == 0 and b"warm start" in proc.stderr, proc.stderr.decode()
        outs.append(proc.stdout.decode().split("\n"))
    assert [o[0] for o in outs] == ["warm-a", "warm-b"]
    assert outs[0][1] != outs[1][1]
    for o in outs:
        assert abs(int(o[2]) - time.time()) <= 2


def test_boot_snapshots_are_listed_with_all(api: httpx.Client, store: ImageStore) -> None:
    _warm_entry()
    boot = [s for s in api.get("/v1/snapshots", params={"all": "true"}).json()
            if s["kind"] == "boot"]
    assert boot and all(s["image_id"] for s in boot)
    assert all(s["kind"] == "user" for s in api.get("/v1/snapshots").json())
    proc = ember("doctor")
    assert b"boot snapshots" in proc.stdout + proc.stderr


def test_daemon_machines_start_warm_and_can_be_snapshotted(api: httpx.Client,
                                                           store: ImageStore) -> None:
    """The daemon's machines use the boot snapshots too; such a machine (its memory a
    copy of the boot snapshot's) is snapshotted like a booted one."""
    names = ["warm-d1", "warm-d2"]
    try:
        create(api, name=names[0], cmd=["sleep", "3600"])
        start(api, names[0])  # keeps the shape's boot snapshot if none exists yet

        def warm_second() -> bool:  # (committed on a thread: a start may come too early)
            delete(api, names[1])
            create(api, name=names[1], cmd=["sleep", "3600"])
            start(api, names[1])
            console = api.get(f"/v1/machines/{names[1]}/logs",
                              params={"source": "console"}).text
            return "restored from snapshot" in console and "Linux version" in console

        wait_for("a warm start", warm_second, timeout=60)
        assert run(api, names[1], "hostname")["stdout"] == f"{names[1]}\n"
        assert run(api, names[1], "sh", "-c", "echo warm-write > /tmp/w")["exit_code"] == 0
        r = api.post(f"/v1/machines/{names[1]}/snapshots", json={"tag": "warm-d2-snap"})
        assert r.status_code == 201, r.text
        proc = ember("run", "-q", "--from", "warm-d2-snap", "--", "cat", "/tmp/w")
        assert (proc.returncode, proc.stdout) == (0, b"warm-write\n"), proc.stderr.decode()
    finally:
        for name in names:
            delete(api, name)
        api.delete("/v1/snapshots/warm-d2-snap", params={"force": "true"})


def test_a_clone_can_be_snapshotted_and_cloned_again(api: httpx.Client,
                                                     snapshot: dict[str, Any]) -> None:
    create(api, snapshot=snapshot["id"], name="snap-gen1", cmd=["sleep", "3600"])
    try:
        start(api, "snap-gen1")
        assert run(api, "snap-gen1", "sh", "-c", "echo gen1 > /tmp/gen")["exit_code"] == 0
        r = api.post("/v1/machines/snap-gen1/snapshots", json={"tag": "snap-gen1-s"})
        assert r.status_code == 201, r.text
        proc = ember("run", "-q", "--from", "snap-gen1-s", "--", "sh", "-c",
                     "cat /tmp/before /tmp/gen")
        assert (proc.returncode, proc.stdout) == (0, b"before\ngen1\n"), proc.stderr.decode()
    finally:
        delete(api, "snap-gen1")
        api.delete("/v1/snapshots/snap-gen1-s", params={"force": "true"})


def test_a_warm_run_starts_ahead_from_its_plan_and_a_stale_plan_changes_nothing(
        store: ImageStore) -> None:
    _warm_entry()
    _warm_entry()  # a warm run keeps the plan the next one starts from
    proc = ember("-v", "run", "sample", "--", "echo", "ahead")
    assert proc.returncode == 0 and proc.stdout == b"ahead\n", proc.stderr.decode()
    assert b"started ahead from its plan" in proc.stderr
    # a plan that no longer holds (another memory size here) is discarded, and the run
    # is as it would have been without it
    plans = list((paths.cache_dir() / "run-plans").glob("*.json"))
    assert plans
    for p in plans:
        doc = json.loads(p.read_text())
        doc["spec"]["memory_mib"] = 128
        p.write_text(json.dumps(doc))
    before = _machines()
    proc = ember("-v", "run", "sample", "--", "echo", "still")
    assert proc.returncode == 0 and proc.stdout == b"still\n", proc.stderr.decode()
    assert b"no longer holds: discarded" in proc.stderr
    assert _machines() == before  # the speculative machine is gone
    proc = ember("-v", "run", "sample", "--", "echo", "again")  # the plan was renewed
    assert b"started ahead from its plan" in proc.stderr, proc.stderr.decode()
