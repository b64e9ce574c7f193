"""QMP, through the official client library (``qemu.qmp``).

Ember talks QMP synchronously from ordinary threads, so it uses the library's
``legacy.QEMUMonitorProtocol`` wrapper, which runs the asyncio protocol on a
private event loop. Imported lazily: asyncio costs tens of milliseconds at
start-up, and ``ember run``'s fast path never needs QMP.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from ember.errors import VMMError


class QMPClient:
    """A connected QMP session; a context manager that closes it."""

    def __init__(self, qmp: QEMUMonitorProtocol) -> None:
        self._qmp = qmp

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> QMPClient:
        qmp = QEMUMonitorProtocol(path)
        try:
            qmp.connect(negotiate=True)
        except (QMPError, OSError) as exc:
            raise VMMError(f"cannot connect to QMP at {path}: {exc}") from exc
        return cls(qmp)

    def execute(self, command: str, **args: Any) -> Any:
        """Run one QMP command and return its ``return`` value.

        Raises:
            VMMError: QEMU answered with an error, or the connection failed.
        """
        try:
            return self._qmp.cmd(command, **args)
        except (QMPError, OSError) as exc:
            raise VMMError(f"QMP {command} failed: {exc}") from exc

    def close(self) -> None:
        try:
            self._qmp.close()
        except (QMPError, OSError):
            pass

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
