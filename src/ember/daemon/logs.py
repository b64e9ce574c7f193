"""A machine's main-process output log: appended from the agent's reader thread, capped.

Like the console (vmm/console.py), a log is at most two files of ``cap`` bytes:
``NAME`` and ``NAME.1``, the newest output kept. A service that prints
without end cannot fill the host's disk.

The log itself is the raw bytes, as the process wrote them. Beside each file,
``NAME.idx`` records when its bytes arrived: one 16-byte entry (arrival time in
ns since the epoch, offset in the file) per write, a write within a
millisecond of the last entry sharing it. That is what ``logs --timestamps``
and ``--since`` read: a line's time is the arrival of its first byte. The
index rotates with its file, so it is bounded by the same cap (at most one
entry per byte written, in practice one per write).
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

DEFAULT_CAP = 1 << 20
_ENTRY = struct.Struct("<qq")
#: Writes closer than this to the last index entry share its time.
_COALESCE_NS = 1_000_000


def index_path(path: Path) -> Path:
    return path.with_name(path.name + ".idx")


def previous_path(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class CappedLog:
    def __init__(self, path: Path, cap: int = DEFAULT_CAP) -> None:
        self.path = path
        self.cap = cap
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._idx = os.open(index_path(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND
                            | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size
        self._last_ns = 0

    @property
    def previous(self) -> Path:
        return previous_path(self.path)

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._fd < 0:
                return
            view = memoryview(data)
            while view:
                room = self.cap - self._size
                if room <= 0:
                    self._rotate()
                    room = self.cap
                self._stamp()
                n = os.write(self._fd, view[:room])
                self._size += n
                view = view[n:]

    def _stamp(self) -> None:
        t = time.time_ns()
        if t - self._last_ns >= _COALESCE_NS or self._size == 0:
            os.write(self._idx, _ENTRY.pack(t, self._size))
            self._last_ns = t

    def _rotate(self) -> None:
        os.replace(index_path(self.path), index_path(self.previous))
        os.replace(self.path, self.previous)
        for fd in (self._fd, self._idx):
            os.close(fd)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_TRUNC
        self._fd = os.open(self.path, flags, 0o600)
        self._idx = os.open(index_path(self.path), flags, 0o600)
        self._size = 0

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                os.close(self._idx)
                self._fd = self._idx = -1


def _read(path: Path, start: int = 0, limit: int = -1) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(limit)
    except OSError:
        return b""


def _entries(path: Path) -> list[tuple[int, int]]:
    """(offset, time ns) of each index entry of log file ``path``, by offset."""
    raw = _read(index_path(path))
    out = [(off, t) for t, off in _ENTRY.iter_unpack(raw[: len(raw) - len(raw) % _ENTRY.size])]
    out.sort()
    return out


def format_time(ns: int) -> str:
    """RFC 3339 with nanoseconds, UTC (as ``docker logs --timestamps``)."""
    secs, frac = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


@dataclass
class LogView:
    """How a reader wants the log: all of it, or lines from ``since_ns``, the last ``tail``,
    each prefixed by its time."""

    since_ns: int | None = None
    timestamps: bool = False
    tail: int = 0

    @property
    def plain(self) -> bool:
        return self.since_ns is None and not self.timestamps


@dataclass
class _Chunk:
    data: bytes
    entries: list[tuple[int, int]] = field(default_factory=list)  # (offset in data, time ns)

    def time_at(self, offset: int) -> int | None:
        i = bisect.bisect_right(self.entries, (offset, 1 << 62)) - 1
        return self.entries[i][1] if i >= 0 else None


def _lines(chunk: _Chunk, view: LogView, at_line_start: bool) -> tuple[list[bytes], bool]:
    """The chunk cut in lines, filtered and prefixed as ``view`` asks."""
    out: list[bytes] = []
    pos = 0
    data = chunk.data
    keep = True
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end + 1
        piece = data[pos:end]
        if at_line_start:
            t = chunk.time_at(pos)
            keep = view.since_ns is None or (t is not None and t >= view.since_ns)
            if keep and view.timestamps:
                piece = (format_time(t) + " " if t is not None else "- ").encode() + piece
        if keep:
            out.append(piece)
        at_line_start = piece.endswith(b"\n")
        pos = end
    return out, at_line_start


def read_log(path: Path, view: LogView | None = None, end: int = -1) -> bytes:
    """The whole log (both files, oldest first), or as ``view`` asks; with ``end`` >= 0,
    only the first ``end`` bytes of the current file (where a :class:`LogFollower` starts)."""
    view = view or LogView()
    chunks = [_Chunk(_read(p, 0, limit), _entries(p) if not view.plain else [])
              for p, limit in ((previous_path(path), -1), (path, end))]
    if view.plain:
        data = b"".join(c.data for c in chunks)
        return _tail(data.split(b"\n"), data.endswith(b"\n"), view.tail)
    lines: list[bytes] = []
    at_start = True
    for c in chunks:
        got, at_start = _lines(c, view, at_start)
        lines.extend(got)
    if view.tail > 0:
        lines = lines[-view.tail:]
    return b"".join(lines)


def _tail(parts: list[bytes], ends_with_newline: bool, lines: int) -> bytes:
    if lines > 0:
        keep = lines + 1 if ends_with_newline else lines
        parts = parts[-keep:]
    return b"\n".join(parts)


class LogFollower:
    """New output of a log as it is appended, across rotations, none lost or repeated.

    Starts at the end of the log as it is now. Each :meth:`poll` returns what
    was appended since the last one (formatted as ``view`` asks). A rotation
    between two polls is noticed by the file's inode: the rest of the old file
    (now ``NAME.1``) is read first.
    """

    def __init__(self, path: Path, view: LogView | None = None, limit: int = 1 << 20) -> None:
        self.path = path
        self.view = view or LogView()
        self.limit = limit
        self._ino = _inode(path)
        self._pos = _size(path)
        # a line the history ends in the middle of goes on without a second timestamp
        self._at_line_start = self._pos == 0 or _read(path, self._pos - 1, 1) in (b"", b"\n")

    def history(self) -> bytes:
        """The log up to where following starts (``read_log`` as the view asks)."""
        return read_log(self.path, self.view, end=self._pos)

    def poll(self) -> bytes:
        out = b""
        ino = _inode(self.path)
        if ino != self._ino:  # rotated: finish the old file, now NAME.1
            old = previous_path(self.path)
            if _inode(old) == self._ino and self._ino:
                out += self._read(old)
            self._ino, self._pos = ino, 0
        elif _size(self.path) < self._pos:  # truncated (a log removed and started again)
            self._pos = 0
        return out + self._read(self.path)

    def _read(self, path: Path) -> bytes:
        data = _read(path, self._pos, self.limit)
        if not data:
            return b""
        start = self._pos
        self._pos += len(data)
        if self.view.plain:
            return data
        entries = [(off - start, t) for off, t in _entries(path)]
        got, self._at_line_start = _lines(_Chunk(data, entries), self.view,
                                          self._at_line_start)
        return b"".join(got)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _inode(path: Path) -> int:
    try:
        return path.stat().st_ino
    except OSError:
        return 0
