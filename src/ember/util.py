"""Small shared helpers: running host commands, atomic writes, progress."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ember.errors import HostError, SubprocessFailed

log = logging.getLogger("ember")

#: A progress callback: receives one short human line per step.
Progress = Callable[[str], None]


def stderr_progress(message: str) -> None:
    """Default progress sink: one line on stderr, prefixed with ``ember:``."""
    print(f"ember: {message}", file=sys.stderr, flush=True)


def no_progress(message: str) -> None:
    """A progress sink that drops everything."""


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    stdout_path: Path | None = None,
    timeout: float | None = None,
) -> str:
    """Run a host command, log it, return its stdout; raise on failure.

    With ``stdout_path`` the command's stdout and stderr go to that file (for
    long, chatty builds) and the returned string is empty.

    Raises:
        HostError: the program does not exist.
        SubprocessFailed: it exited non-zero (carries its stderr, or the log's tail).
    """
    argv = [os.fspath(c) for c in cmd]
    log.debug("run: %s", " ".join(argv))
    try:
        if stdout_path is not None:
            with open(stdout_path, "wb") as out:
                proc = subprocess.run(argv, cwd=cwd, env=env, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=timeout)
            if proc.returncode != 0:
                tail = stdout_path.read_text(errors="replace")[-4000:]
                raise SubprocessFailed(argv, proc.returncode, tail)
            return ""
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise HostError(f"{argv[0]} is not installed (run `ember setup`)") from exc
    if proc.returncode != 0:
        raise SubprocessFailed(argv, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc.stdout.decode(errors="replace")


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise



def parse_signal(text: str | int) -> int:
    """A signal by number (``15``) or name (``SIGTERM``, ``TERM``, ``term``), as ``kill -s``.

    Raises:
        ValueError: no such signal (the message says so in one line).
    """
    import signal

    if isinstance(text, int) or (isinstance(text, str) and text.isascii() and text.isdigit()):
        n = int(text)
        if 1 <= n < signal.NSIG:
            return n
        raise ValueError(f"signal {text} is not between 1 and {signal.NSIG - 1}")
    name = text.strip().upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    sig = getattr(signal, name, None)
    if not isinstance(sig, signal.Signals) or name.startswith("SIG_"):
        raise ValueError(f"unknown signal {text!r} (e.g. SIGTERM, TERM or 15)")
    return int(sig)


def try_lock(path: str | os.PathLike[str], *, create: bool = False) -> int | None:
    """An exclusive ``flock`` on ``path`` if nobody holds one: the descriptor holding it
    (close it to let go; a child that inherits it holds it too), or None when it is held.

    Raises:
        FileNotFoundError: ``path`` does not exist and ``create`` is false.
    """
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
