"""The daemon-backed CLI (`ember run -d`, ps, exec, cp, logs...) as a user types it."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Daemon


def ember(*args: str, stdin: bytes | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "ember", *args], capture_output=True,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          timeout=timeout, env=os.environ.copy())


def ok(*args: str, stdin: bytes | None = None) -> str:
    proc = ember(*args, stdin=stdin)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


@pytest.fixture(scope="module")
def svc(daemon: Daemon) -> Iterator[str]:
    """`ember run -d`: a running service machine for the module."""
    name = ok("run", "-d", "--name", "cli-svc", "-p", "8080", "-e", "WHO=cli",
              "sample:latest", "--", "sh", "-c", "echo service up; exec sleep 3600").strip()
    assert name == "cli-svc"
    yield name
    ember("rm", "-f", name)


def test_run_detached_shows_in_ps_and_port(svc: str) -> None:
    assert svc in ok("ps").split()
    (m,) = [m for m in json.loads(ok("ps", "--json")) if m["name"] == svc]
    assert m["state"] == "running"
    (port,) = json.loads(ok("port", svc, "--json"))
    assert ok("port", svc).strip() == f"8080/tcp -> 127.0.0.1:{port['host_port']}"
    assert json.loads(ok("inspect", svc))[0]["env"] == {"WHO": "cli"}


def test_exec_keeps_streams_apart_and_exits_with_the_commands_status(svc: str) -> None:
    proc = ember("exec", svc, "--", "sh", "-c", "echo $WHO; echo err >&2; exit 7")
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, b"cli\n", b"err\n")
    proc = ember("exec", svc, "--", "wc", "-c", stdin=b"\xff\x00binary")
    assert (proc.returncode, proc.stdout.split()[0]) == (0, b"8")
    proc = ember("exec", svc, "--", "nosuch")
    assert proc.returncode == 127 and proc.stderr.startswith(b"ember: error: ")


def ember_peak_rss(*args: str, stdin: IO[bytes] | int = subprocess.DEVNULL,
                   tmp: Path) -> tuple[int, int, bytes, bytes]:
    """Run the CLI; its exit status, peak RSS in bytes (its own), stdout and stderr."""
    with open(tmp / "out", "w+b") as out, open(tmp / "err", "w+b") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ember", *args], stdin=stdin,
                                stdout=out, stderr=err, env=os.environ.copy())
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, usage.ru_maxrss << 10, out.read(), err.read()


def test_piped_stdin_of_any_size_streams_in_bounded_memory(svc: str, daemon: Daemon,
                                                           tmp_path: Path) -> None:
    """`tar c src | ember exec web -- tar x` of cli.md, at 50 MB: all of it arrives, yet
    neither the CLI nor the daemon holds it whole. The guest reads nothing for 45 s
    first: longer than the WebSocket keepalive's 20 s interval and 20 s timeout,
    which must not end a session whose sender is held back by flow control."""
    from test_daemon_exec import peak_rss, reset_peak_rss

    assert daemon.proc is not None
    data = tmp_path / "big.bin"
    data.write_bytes(os.urandom(50_000_000))
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    code, cli_base, _, err = ember_peak_rss("exec", svc, "--", "true", tmp=tmp_path)
    assert code == 0, err
    daemon_base = reset_peak_rss(daemon.proc.pid)
    with open(data, "rb") as f:
        code, cli_peak, out, err = ember_peak_rss(
            "exec", svc, "--", "sh", "-c", "sleep 45; exec sha256sum", stdin=f, tmp=tmp_path)
    assert (code, out.decode().split()) == (0, [digest, "-"]), err
    assert peak_rss(daemon.proc.pid) - daemon_base < 24 << 20
    assert cli_peak - cli_base < 24 << 20
    # text past what a request's stdin takes (16 Mi characters) streams too
    proc = ember("exec", svc, "--", "wc", "-c", stdin=b"a" * 20_000_000)
    assert (proc.returncode, proc.stdout) == (0, b"20000000\n"), proc.stderr
    # and a little text still works (it goes in the request itself)
    assert ok("exec", svc, "--", "cat", stdin="héllo\n".encode()) == "héllo\n"


def test_a_command_answering_its_stdin_with_much_output_loses_none(svc: str,
                                                                   tmp_path: Path) -> None:
    """Output is read while stdin waits: here the command writes 20 MB before it reads
    the rest of its 16 MiB of input, so its input backs up all the way to the CLI."""
    data = tmp_path / "in"
    data.write_bytes(b"\0" * (16 << 20))
    script = "head -c 1 >/dev/null; head -c 20000000 /dev/zero; exec cat >/dev/null"
    with open(data, "rb") as f:
        code, _, out, err = ember_peak_rss("exec", svc, "--", "sh", "-c", script, stdin=f,
                                           tmp=tmp_path)
    assert (code, len(out), err) == (0, 20_000_000, b"")


def test_output_nobody_reads_is_cut_short_and_exec_says_so(svc: str) -> None:
    flag = f"/tmp/written.{os.getpid()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember", "exec", svc, "--", "sh", "-c",
         f"head -c 40000000 /dev/zero; touch {flag}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Nothing reads its output until the command has written all of it, which the
        # daemon allows only once it gave up on this client (after 10 s) and dropped
        # the rest.
        ok("exec", svc, "--", "sh", "-c",
           f"n=0; until [ -e {flag} ]; do n=$((n+1)); [ $n -lt 1200 ] || exit 1; sleep 0.1; done")
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 125, err
    assert err == (b"ember: error: the command's output was cut short: it was not read for "
                   b"10 s (the daemon dropped the rest; the command exited 0)\n")
    assert len(out) < 40_000_000


_CMDLINES = 'for p in /proc/[0-9]*; do tr "\\0" " " < "$p/cmdline" 2>/dev/null; echo; done'


@pytest.mark.parametrize("stdin", [None, b"x" * (2 << 20)], ids=["no-stdin", "streamed-stdin"])
def test_exec_timeout_kills_the_command_and_says_so(svc: str, stdin: bytes | None) -> None:
    marker = f"1000.{os.getpid()}{len(stdin or b'')}"
    proc = ember("exec", "--timeout", "1", svc, "--", "sh", "-c",
                 f"cat >/dev/null; exec sleep {marker}", stdin=stdin)
    assert proc.returncode == 137, proc.stderr  # 128 + SIGKILL, as for any killed command
    assert proc.stderr == b"ember: error: the command timed out and was killed\n"
    deadline = time.monotonic() + 60
    while f"sleep {marker} " in ok("exec", "-u", "root", svc, "--", "sh", "-c", _CMDLINES):
        assert time.monotonic() < deadline, "the command lives on in the guest"
        time.sleep(0.1)


@pytest.mark.timeout(120)  # waitpid blocks for as long as ember exec runs
def test_exec_it_gives_a_terminal(svc: str) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: ember exec -it on a real terminal
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        os.execv(sys.executable, [sys.executable, "-m", "ember", "exec", "-it", svc, "--",
                                  "sh", "-c", "stty size; read x; echo got $x; exit 9"])
    out = b""
    sent = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if not sent and b"30 100" in out:  # the guest terminal is up, with our size
                os.write(fd, b"typed\r")
                sent = True
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    except BaseException:  # a failure or the test's timeout: the child goes too
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 9, out
    assert b"got typed" in out


def test_logs(svc: str) -> None:
    deadline = time.monotonic() + 10
    while "service up" not in ok("logs", svc):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert ok("logs", "--tail", "1", svc) == "service up\n"


def test_cp_both_ways(svc: str, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("payload\n")
    ok("cp", str(src), f"{svc}:/srv/")
    assert ok("exec", svc, "--", "cat", "/srv/tree/sub/f.txt") == "payload\n"
    ok("cp", str(src / "sub" / "f.txt"), f"{svc}:/srv/renamed.txt")
    assert ok("exec", svc, "--", "cat", "/srv/renamed.txt") == "payload\n"
    back = tmp_path / "back"
    ok("cp", f"{svc}:/srv/tree", str(back))
    assert (back / "sub" / "f.txt").read_text() == "payload\n"
    ok("cp", f"{svc}:/etc/hostname", str(tmp_path))
    assert (tmp_path / "hostname").read_text() == f"{svc}\n"
    proc = ember("cp", f"{svc}:/no/such", str(tmp_path))
    assert proc.returncode == 125 and len(proc.stderr.splitlines()) == 1


def test_lifecycle_commands(daemon: Daemon) -> None:
    name = ok("create", "--name", "cli-life", "sample:latest", "--", "sleep", "600").strip()
    assert name == "cli-life"
    assert "cli-life" not in ok("ps").split() and "cli-life" in ok("ps", "-a").split()
    ok("start", name)
    ok("pause", name)
    assert json.loads(ok("inspect", name))[0]["state"] == "paused"
    ok("resume", name)
    proc = ember("rm", name)
    assert proc.returncode == 125 and b"running" in proc.stderr
    ok("stop", "-t", "1", name)
    assert json.loads(ok("inspect", "--json", name))[0]["state"] == "stopped"
    ok("rm", name)
    proc = ember("inspect", name)
    assert proc.returncode == 125 and proc.stderr.decode().startswith("ember: error: ")


def test_the_cli_starts_one_daemon_by_itself(tmp_path: Path, guest: object) -> None:
    """A new user's first command finds no daemon: it starts one (and racing CLIs, just one)."""
    home = tmp_path / "h"
    env = {**os.environ, "EMBER_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-m", "ember", "ps", "-a", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for _ in range(3)]
    try:
        outs = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
        assert all(json.loads(o) == [] for o, _ in outs)
        pid = int((home / "daemon.pid").read_text())
        os.kill(pid, 0)
        servers = [p for p in Path("/proc").iterdir() if p.name.isdigit()
                   and _environ_home(p) == str(home) and b"serve" in _cmdline(p)]
        assert [int(p.name) for p in servers] == [pid]
        assert (home / "ember.sock").stat().st_mode & 0o777 == 0o600
    finally:
        with open(home / "daemon.pid") as f:
            os.kill(int(f.read()), signal.SIGTERM)


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


def _environ_home(p: Path) -> str | None:
    try:
        for item in (p / "environ").read_bytes().split(b"\0"):
            if item.startswith(b"EMBER_HOME="):
                return item.split(b"=", 1)[1].decode()
    except OSError:
        pass
    return None
