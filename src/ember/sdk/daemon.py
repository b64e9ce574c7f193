"""Starting the daemon on demand: what ``ember ps`` does when nothing listens yet.

The daemon is ``python -m ember serve`` in its own session (so a Ctrl-C in the
terminal that started it does not reach it), logging to ``DATA_DIR/daemon.log``.
Two clients racing to start it take ``DATA_DIR/daemon.lock`` (``flock``) in
turn: the first spawns and waits for ``/v1/version`` to answer; the second then
finds it answering. (The daemon itself holds ``daemon.pid`` for its whole life,
so even a start that slipped past this lock could not make a second daemon.)
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

import httpx

from ember.sdk.errors import DaemonUnavailable
from ember.util import log

#: Seconds a started daemon gets to answer.
START_TIMEOUT = 15.0
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


def ensure_daemon(sock: Path, *, timeout: float = START_TIMEOUT) -> None:
    """Make sure a daemon answers on ``sock``, starting one if nothing listens.

    Raises:
        DaemonUnavailable: the daemon could not be started, exited, or did not
            answer within ``timeout`` seconds (the message points at daemon.log).
    """
    if answers(sock):
        return
    if sock.name != SOCKET_NAME:
        raise DaemonUnavailable(f"no ember daemon answers on {sock} (only a socket named "
                                f"{SOCKET_NAME} in a data dir can be started on demand)")
    home = sock.parent
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    logfile = home / "daemon.log"
    deadline = time.monotonic() + timeout
    fd = os.open(home / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _lock(fd, deadline, home)
        proc = None
        if not connectable(sock):
            proc = _spawn(home, logfile)
        _wait(sock, deadline, timeout, proc, logfile)
    finally:
        os.close(fd)  # releases the lock


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
