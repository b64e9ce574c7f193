"""The guest's serial console, recorded with a size cap.

QEMU could write the console straight to a file, but then a guest that prints
without end (a root process can ``cat /dev/zero > /dev/console``; the UART
moves about half a megabyte a second under TCG) fills the host's disk. So
QEMU is a *client* of a Unix socket Ember listens on, and a thread here copies
what arrives into ``console.log``, moving it to ``console.log.1`` whenever it
reaches ``cap`` bytes: at most two caps of console are kept, the newest.

QEMU connects during its own start-up, before the guest runs, so nothing the
kernel prints is missed; and since the recorder reads until QEMU closes the
socket, the console's last lines are on disk when QEMU dies.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

#: Bytes per console file; two are kept (``console.log`` and ``console.log.1``).
DEFAULT_CAP = 1 << 20


class ConsoleRecorder:
    """Accepts QEMU's console connection on ``listener``; appends to ``log`` with a cap."""

    def __init__(self, listener: socket.socket, log: Path, cap: int = DEFAULT_CAP) -> None:
        self._listener = listener
        self._log = log
        self._cap = cap
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ember-console", daemon=True)
        self._thread.start()

    @property
    def previous(self) -> Path:
        return self._log.with_name(self._log.name + ".1")

    def _run(self) -> None:
        out = open(self._log, "ab", buffering=0)  # noqa: SIM115 (closed below, rotated inside)
        try:
            self._listener.settimeout(0.2)
            conn = None
            while conn is None and not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    conn, _ = self._listener.accept()
            if conn is None:
                return
            with conn:
                size = out.tell()
                while True:
                    try:
                        data = conn.recv(min(65536, self._cap))
                    except OSError:
                        return
                    if not data:
                        return
                    if size + len(data) > self._cap:
                        out.close()
                        os.replace(self._log, self.previous)
                        out = open(self._log, "ab", buffering=0)  # noqa: SIM115
                        size = 0
                    out.write(data)
                    size += len(data)
        finally:
            out.close()
            self._listener.close()

    def wait(self, timeout: float) -> None:
        """Wait until QEMU closed the console (it exited) and everything is on disk."""
        self._thread.join(timeout)

    def stop(self) -> None:
        """Stop accepting (if QEMU never connected); the copy ends when QEMU goes."""
        self._stop.set()


def listen(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` for QEMU's console chardev to connect to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


def tail(log: Path, lines: int) -> str:
    """The last ``lines`` lines of the console (reaching into the rotated file if needed)."""
    chunks = []
    for path in (log.with_name(log.name + ".1"), log):
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                chunks.append(f.read())
        except FileNotFoundError:
            continue
    text = b"".join(chunks).decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])
