"""One event of a streamed exec (``POST /v1/machines/{name}/exec/stream``), output as bytes.

Light on purpose: the CLI's lean path (``cli/wire.py``) decodes the stream with
:meth:`ExecEvent.from_json`, without the SDK's pydantic models (which validate it,
``sdk/_common.py``'s ``decode_exec_event``).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ExecEvent:
    """One event of a streamed exec, with output decoded to bytes.

    ``type`` is ``started`` (``pid``), ``stdout`` / ``stderr`` (``data``),
    ``exit`` (``exit_code``, ``signal``, ``timed_out``, ``truncated``: output was
    dropped because the client did not read it for 10 s; always the last) or
    ``error`` (``message``, ``exit_code``: the process could not be run or the
    machine went away).
    """

    type: str
    data: bytes = b""
    pid: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    message: str | None = None
    truncated: bool = False

    @property
    def final(self) -> bool:
        return self.type in ("exit", "error")

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ExecEvent:
        """From a decoded NDJSON line, as the daemon sends it (``ExecEvent`` schema)."""
        data = doc.get("data")
        return cls(type=str(doc.get("type", "")),
                   data=base64.b64decode(data) if data else b"",
                   pid=doc.get("pid"), exit_code=doc.get("exit_code"),
                   signal=doc.get("signal"), timed_out=bool(doc.get("timed_out")),
                   message=doc.get("message"), truncated=bool(doc.get("truncated")))
