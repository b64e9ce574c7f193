"""QMP, QEMU's JSON control protocol: a small synchronous client.

QMP is line-oriented JSON over a Unix socket: a greeting, ``qmp_capabilities``,
then one ``{"execute": ..., "id": ...}`` per command, answered by a ``return``
or an ``error`` with the same id; asynchronous ``event`` messages may arrive
in between. Ember issues one command at a time from ordinary threads, so a
blocking socket is all it needs. The official client (``qemu.qmp``) runs
asyncio on a private loop and costs ~110 ms to import, more than a whole warm
start from a snapshot; this one costs nothing.

Only vmm/ talks QMP. QEMU is trusted no more than its guest: every line is
bounded (``MAX_LINE``) and its shape checked.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from types import TracebackType
from typing import Any

from ember.errors import VMMError

#: The longest QMP message accepted (query results of a microVM are a few KiB).
MAX_LINE = 4 << 20


class QMPClient:
    """A connected, negotiated QMP session; a context manager that closes it."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        self._buf = b""
        self._ids = itertools.count(1)
        self._timeout = timeout
        #: Asynchronous events received so far (``{"event": NAME, "data": ...}``).
        self.events: list[dict[str, Any]] = []

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> QMPClient:
        """Connect to the QMP socket at ``path`` and leave capabilities negotiation.

        Raises:
            VMMError: the connection or the negotiation failed.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise VMMError(f"cannot connect to QMP at {path}: {exc.strerror or exc}") from exc
        client = cls(sock, timeout)
        try:
            greeting = client._read()
            if "QMP" not in greeting:
                raise VMMError(f"QMP at {path}: no greeting")
            client.execute("qmp_capabilities")
        except BaseException:
            client.close()
            raise
        return client

    def execute(self, command: str, **args: Any) -> Any:
        """Run one QMP command and return its ``return`` value.

        Raises:
            VMMError: QEMU answered with an error, or the connection failed.
        """
        ident = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if args:
            msg["arguments"] = args
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as exc:
            raise VMMError(f"QMP {command} failed: {exc.strerror or exc}") from exc
        return self._answer(command, ident)

    def _answer(self, command: str, ident: int) -> Any:
        deadline = time.monotonic() + self._timeout
        while True:
            reply = self._read(deadline, command)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != ident:
                continue  # an answer to a command given up on earlier
            if "error" in reply:
                err = reply["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise VMMError(f"QMP {command} failed: {desc}")
            return reply.get("return")

    def execute_with_fd(self, command: str, fd: int, **args: Any) -> Any:
        """Run ``command`` with ``fd`` attached (SCM_RIGHTS), as ``getfd`` needs."""
        import array

        ident = next(self._ids)
        msg = {"execute": command, "id": ident, "arguments": args}
        try:
            self._sock.sendmsg([json.dumps(msg).encode() + b"\n"],
                               [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        except OSError as exc:
            raise VMMError(f"QMP {command} failed: {exc.strerror or exc}") from exc
        return self._answer(command, ident)

    def _read(self, deadline: float | None = None, what: str = "greeting") -> dict[str, Any]:
        deadline = deadline if deadline is not None else time.monotonic() + self._timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise VMMError(f"QMP {what}: no answer within {self._timeout:g} s")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise VMMError(f"QMP {what} failed: {exc.strerror or exc}") from exc
            if not data:
                raise VMMError(f"QMP {what} failed: QEMU closed the connection")
            self._buf += data
            if len(self._buf) > MAX_LINE and b"\n" not in self._buf:
                raise VMMError(f"QMP {what}: a message longer than {MAX_LINE} bytes")
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise VMMError(f"QMP {what}: malformed message from QEMU") from exc
        if not isinstance(obj, dict):
            raise VMMError(f"QMP {what}: malformed message from QEMU")
        return obj

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
