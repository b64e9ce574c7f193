"""Starting the daemon on demand: what ``ember ps`` does when nothing listens yet.

The daemon is ``python -m ember serve`` in its own session (so a Ctrl-C in the
terminal that started it does not reach it), logging to ``DATA_DIR/daemon.log``.
Two clients racing to start it take ``DATA_DIR/daemon.lock`` (``flock``) in
turn: the first spawns and waits for ``/v1/version`` to answer; the second then
finds it answering.

The daemon holds a lock on ``DATA_DIR/daemon.pid`` for its whole life, so a
second one cannot start, and a client can tell what a daemon that does not
answer is doing. Lock free: there is none, start one. Lock held and the socket
accepts connections: it is starting (it binds the socket before it loads its
state), wait for it. Lock held and the socket refuses connections: it is
shutting down (its listener is closed while it finishes the streams still
open), wait for it to exit, then start a new one. Both waits are bounded.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from ember._httpx import httpx
from ember.sdk.errors import DaemonUnavailable
from ember.util import log

#: Seconds a started daemon gets to answer.
START_TIMEOUT = 15.0
#: Seconds a daemon that is shutting down gets to exit before a new one is started.
STOP_TIMEOUT = 15.0
SOCKET_NAME = "ember.sock"

# Started daemons, kept so that no "subprocess still running" warning fires
# when a client is collected; the daemon outlives the client by design.
_spawned: list[subprocess.Popen[bytes]] = []


def serve_argv() -> list[str]:
    """The daemon's command line (a function, so tests can put a stub in its place)."""
    return [sys.executable, "-m", "ember", "serve"]


def connectable(sock: Path) -> bool:
    """Whether something accepts connections on ``sock`` (a daemon, maybe still starting)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


def answers(sock: Path, timeout: float = 2.0) -> bool:
    """Whether the daemon on ``sock`` answers ``GET /v1/version``."""
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), trust_env=False,
                          base_url="http://ember", timeout=timeout) as c:
            return c.get("/v1/version").status_code == 200
    except httpx.HTTPError:
        return False


def ensure_daemon(sock: Path, *, timeout: float = START_TIMEOUT,
                  stop_timeout: float = STOP_TIMEOUT) -> None:
    """Make sure a daemon answers on ``sock``, starting one if none runs.

    A daemon that is still starting is waited for (``timeout`` seconds); one
    that is shutting down is waited for to exit (``stop_timeout`` seconds),
    then a new one is started.

    Raises:
        DaemonUnavailable: the daemon could not be started, exited, did not
            answer within ``timeout`` seconds (the message points at daemon.log),
            or an old one did not finish shutting down in ``stop_timeout``.
    """
    if answers(sock):
        return
    if sock.name != SOCKET_NAME:
        raise DaemonUnavailable(f"no ember daemon answers on {sock} (only a socket named "
                                f"{SOCKET_NAME} in a data dir can be started on demand)")
    home = sock.parent
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    logfile = home / "daemon.log"
    fd = os.open(home / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _lock(fd, time.monotonic() + stop_timeout + timeout, home)
        if _wait_for_running(sock, home, timeout, stop_timeout):
            return
        proc = _spawn(home, logfile)
        _wait(sock, time.monotonic() + timeout, timeout, proc, logfile)
    finally:
        os.close(fd)  # releases the lock


def daemon_pid(home: Path) -> int | None:
    """The pid of the daemon holding ``home/daemon.pid`` (0 if not written yet), or
    None when no daemon process runs for ``home``."""
    try:
        fd = os.open(home / "daemon.pid", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _wait_for_running(sock: Path, home: Path, timeout: float, stop_timeout: float) -> bool:
    """Wait while a daemon process that does not answer runs for ``home``: True once it
    answers (it was starting), False once none runs (it has shut down, or there was none)."""
    started = time.monotonic()
    while True:
        left = max(timeout, stop_timeout) - (time.monotonic() - started)
        if answers(sock, timeout=max(0.1, min(2.0, left))):  # maybe started by the client
            return True                                     # that held daemon.lock before us
        pid = daemon_pid(home)
        if pid is None:
            return False
        who = f"the ember daemon (pid {pid})" if pid else "the ember daemon"
        waited = time.monotonic() - started
        if connectable(sock):  # starting: bound, still loading its state
            if waited > timeout:
                raise DaemonUnavailable(f"{who} accepts connections on {sock} but did not "
                                        f"answer within {timeout:g} s; see "
                                        f"{home / 'daemon.log'}")
        elif waited > stop_timeout:  # shutting down: listener closed, not gone yet
            raise DaemonUnavailable(f"{who} is shutting down and did not exit within "
                                    f"{stop_timeout:g} s; see {home / 'daemon.log'}")
        time.sleep(0.05)


def _lock(fd: int, deadline: float, home: Path) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise DaemonUnavailable(f"another process is starting the ember daemon "
                                        f"and it does not answer; see {home / 'daemon.log'}"
                                        ) from None
            time.sleep(0.05)


def _spawn(home: Path, logfile: Path) -> subprocess.Popen[bytes]:
    argv = serve_argv()
    log.info("starting the ember daemon: %s (log: %s)", " ".join(argv), logfile)
    env = {**os.environ, "EMBER_HOME": str(home)}
    with open(logfile, "ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} started on demand by pid "
                  f"{os.getpid()}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    close_fds=True, cwd="/", env=env)
        except OSError as exc:
            raise DaemonUnavailable(f"cannot start the ember daemon ({argv[0]}): "
                                    f"{exc.strerror}") from None
    _spawned.append(proc)
    return proc


def _wait(sock: Path, deadline: float, timeout: float, proc: subprocess.Popen[bytes] | None,
          logfile: Path) -> None:
    while True:
        if proc is not None and proc.poll() is not None:
            raise DaemonUnavailable(f"the ember daemon exited with status {proc.returncode}: "
                                    f"{_last_line(logfile)} (see {logfile})")
        if answers(sock, timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
            return
        if time.monotonic() > deadline:
            raise DaemonUnavailable(f"the ember daemon did not answer on {sock} within "
                                    f"{timeout:g} s; see {logfile}")
        time.sleep(0.05)


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
            if lines:
                return lines[-1].strip()
    return "no output"
