"""More of the daemon CLI as a user types it: kill, ps -q, rm of several, cp with -, port."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from daemon_api import alive

if TYPE_CHECKING:
    from conftest import Daemon


def ember(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "ember", *args], capture_output=True,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          timeout=120, env=os.environ.copy())


def ok(*args: str, stdin: bytes | None = None) -> str:
    proc = ember(*args, stdin=stdin)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def inspect(name: str) -> dict[str, object]:
    (record,) = json.loads(ok("inspect", "--json", name))  # an array, as docker inspect
    return dict(record)


@pytest.fixture(scope="module")
def svc(daemon: Daemon) -> Iterator[str]:
    """A running machine publishing guest port 80 (on a free host port) and 8080 (on 0)."""
    name = ok("run", "-d", "--name", "cm-svc", "-p", "80", "-p", "8080",
              "sample:latest", "--", "sleep", "3600").strip()
    yield name
    ember("rm", "-f", name)


def test_ps_q_prints_the_ids_of_running_machines_only(svc: str) -> None:
    idle = ok("create", "--name", "cm-idle", "sample:latest", "--", "sleep", "60").strip()
    try:
        svc_id, idle_id = (str(inspect(n)["id"])[:12] for n in (svc, idle))
        ids = ok("ps", "-q").splitlines()
        assert svc_id in ids and idle_id not in ids
        assert all(len(i) == 12 for i in ids)  # Docker's short ids, one a line
        everything = ok("ps", "-q", "-a").splitlines()
        assert {svc_id, idle_id} <= set(everything)
        assert sorted(everything) == sorted(m["id"][:12]
                                            for m in json.loads(ok("ps", "-a", "--json")))
    finally:
        ember("rm", "-f", "cm-idle")


def test_port_names_one_guest_port(svc: str) -> None:
    ports = {p["guest_port"]: p for p in json.loads(ok("port", svc, "--json"))}
    assert set(ports) == {80, 8080}
    assert ok("port", svc, "80") == f"80/tcp -> 127.0.0.1:{ports[80]['host_port']}\n"
    assert ok("port", svc, "8080/tcp") == f"8080/tcp -> 127.0.0.1:{ports[8080]['host_port']}\n"
    proc = ember("port", svc, "81")
    assert proc.returncode == 125
    assert b"does not publish guest port 81" in proc.stderr and proc.stderr.count(b"\n") == 1


def test_cp_a_tar_from_stdin_into_a_directory_and_out_to_stdout(svc: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [("piped/a.txt", b"from stdin\n"), ("piped/b.bin", bytes(range(256)))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ok("cp", "-", f"{svc}:/srv/in", stdin=buf.getvalue())
    assert ok("exec", svc, "--", "cat", "/srv/in/piped/a.txt") == "from stdin\n"
    proc = ember("cp", f"{svc}:/srv/in/piped", "-")
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        assert sorted(tar.getnames()) == ["piped", "piped/a.txt", "piped/b.bin"]
        f = tar.extractfile("piped/b.bin")
        assert f is not None and f.read() == bytes(range(256))
    proc = ember("cp", f"{svc}:/etc/hostname", "-")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        f = tar.extractfile("hostname")
        assert f is not None and f.read() == f"{svc}\n".encode()


def test_kill_powers_a_machine_off_at_once(daemon: Daemon) -> None:
    # a main process that ignores SIGTERM: kill does not wait for it
    ok("run", "-d", "--name", "cm-kill", "sample:latest", "--", "sh", "-c",
       "trap '' TERM; while :; do sleep 1; done")
    try:
        pid = inspect("cm-kill")["pid"]
        assert isinstance(pid, int) and alive(pid)
        assert ok("kill", "cm-kill") == "cm-kill\n"
        m = inspect("cm-kill")
        assert m["state"] == "stopped" and m["pid"] is None and m["exit_code"] == 137
        assert not alive(pid)
        proc = ember("kill", "cm-kill")  # not running any more
        assert proc.returncode == 125 and proc.stderr.count(b"\n") == 1
    finally:
        ember("rm", "-f", "cm-kill")


def test_rm_of_several_removes_all_it_can_and_fails_for_the_rest(daemon: Daemon) -> None:
    for name in ("cm-a", "cm-c"):
        ok("create", "--name", name, "sample:latest", "--", "true")
    proc = ember("rm", "cm-a", "cm-b-does-not-exist", "cm-c")
    assert proc.returncode == 125
    assert proc.stdout.decode().splitlines() == ["cm-a", "cm-c"]
    err = proc.stderr.decode().splitlines()
    assert len(err) == 1 and err[0].startswith("ember: error: ") and "cm-b-does-not-exist" in err[0]
    listed = ok("ps", "-a", "--format", "{{.Names}}").splitlines()
    assert "cm-a" not in listed and "cm-c" not in listed
