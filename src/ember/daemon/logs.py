"""A machine's main-process output log: appended from the agent's reader thread, capped.

Like the console (vmm/console.py), a log is at most two files of ``cap`` bytes:
``NAME`` and ``NAME.1``, the newest output kept. A service that prints
without end cannot fill the host's disk.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

DEFAULT_CAP = 1 << 20


class CappedLog:
    def __init__(self, path: Path, cap: int = DEFAULT_CAP) -> None:
        self.path = path
        self.cap = cap
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size

    @property
    def previous(self) -> Path:
        return self.path.with_name(self.path.name + ".1")

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._fd < 0:
                return
            view = memoryview(data)
            while view:
                room = self.cap - self._size
                if room <= 0:
                    os.replace(self.path, self.previous)
                    os.close(self._fd)
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                                       | os.O_CLOEXEC | os.O_TRUNC, 0o600)
                    self._size = 0
                    room = self.cap
                n = os.write(self._fd, view[:room])
                self._size += n
                view = view[n:]

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def read_tail(path: Path, lines: int = 0) -> bytes:
    """The whole log (both files, oldest first), or its last ``lines`` lines when > 0."""
    data = b""
    for p in (path.with_name(path.name + ".1"), path):
        try:
            data += p.read_bytes()
        except FileNotFoundError:
            pass
    if lines > 0:
        parts = data.split(b"\n")
        keep = lines + 1 if data.endswith(b"\n") else lines
        data = b"\n".join(parts[-keep:])
    return data
