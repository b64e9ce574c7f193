"""The agent protocol's wire format: frames, their decoder, and the typed messages.

See docs/agent-protocol.md. A frame is ``length:u32 type:u8 channel:u32 payload``
(big-endian), ``length = 5 + len(payload)``; control payloads are JSON objects.
Nothing here trusts the peer: lengths are checked before anything is buffered,
and JSON is validated field by field.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from ember.errors import ProtocolError

PROTOCOL_VERSION = 1
#: The largest payload of any frame (1 MiB).
MAX_PAYLOAD = 1 << 20
#: Senders split stream data into payloads of at most this size.
STREAM_CHUNK = 64 * 1024
#: The largest channel id.
MAX_CHANNEL = 0xFFFFFFFF
#: The largest tool the agent accepts (TOOL frames; a static busybox is ~2 MiB).
MAX_TOOL_SIZE = 8 << 20

_HEADER = struct.Struct(">IBI")
HEADER_SIZE = _HEADER.size  # 9
_MIN_LENGTH = 5
_MAX_LENGTH = 5 + MAX_PAYLOAD

#: ERROR codes: on a process channel 127 (not found) or 126 (could not start);
#: these otherwise.
ERROR_BAD_REQUEST = 1
ERROR_FRAMING = 2


class FrameType(IntEnum):
    """Frame types; 0x0_ and 0x1_ go host to guest, 0x2_ (and READY) guest to host."""

    HELLO = 0x01
    READY = 0x02
    EXEC = 0x10
    STDIN = 0x11
    SIGNAL = 0x12
    RESIZE = 0x13
    TOOL = 0x14
    IDENTITY = 0x15
    SHUTDOWN = 0x1F
    STARTED = 0x20
    STDOUT = 0x21
    STDERR = 0x22
    EXIT = 0x23
    ERROR = 0x24
    TOOL_STATUS = 0x25
    IDENTITY_DONE = 0x26


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)


@dataclass(frozen=True)
class Frame:
    """One protocol message."""

    type: FrameType
    channel: int
    payload: bytes = b""


def encode_frame(frame: Frame) -> bytes:
    """The bytes of ``frame`` on the wire.

    Raises:
        ValueError: the channel or the payload size is out of range (a caller bug).
    """
    if not 0 <= frame.channel <= MAX_CHANNEL:
        raise ValueError(f"channel {frame.channel} out of range")
    if len(frame.payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(frame.payload)} bytes exceeds {MAX_PAYLOAD}")
    return _HEADER.pack(5 + len(frame.payload), int(frame.type), frame.channel) + frame.payload


class FrameDecoder:
    """Incremental decoder: feed it bytes as they come, get whole frames back.

    It never holds more than one frame's maximum plus the last chunk fed. A
    bad length or an unknown type raises :class:`ProtocolError` as soon as the
    header shows it, before any of the payload is kept; after an error the
    decoder stays failed (the stream has lost its framing).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held that do not make a whole frame yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        if self._error is not None:
            raise ProtocolError(str(self._error))
        self._buf += data
        frames: list[Frame] = []
        buf = self._buf
        off = 0
        try:
            while len(buf) - off >= _MIN_LENGTH:
                (length,) = struct.unpack_from(">I", buf, off)
                if length < _MIN_LENGTH or length > _MAX_LENGTH:
                    raise ProtocolError(f"bad frame length {length} (allowed 5..{_MAX_LENGTH})")
                ftype = buf[off + 4]
                if ftype not in _KNOWN_TYPES:
                    raise ProtocolError(f"unknown frame type 0x{ftype:02x}")
                end = off + 4 + length
                if len(buf) < end:
                    break
                (channel,) = struct.unpack_from(">I", buf, off + 5)
                frames.append(Frame(FrameType(ftype), channel, bytes(buf[off + HEADER_SIZE:end])))
                off = end
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            raise
        if off:
            del buf[:off]
        return frames


# ----------------------------------------------------------------- JSON payloads


def json_payload(frame: Frame) -> dict[str, Any]:
    """The JSON object of a control frame.

    Raises:
        ProtocolError: the payload is not UTF-8, not JSON, or not an object.
    """
    try:
        obj = json.loads(frame.payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{frame.type.name} payload is not valid UTF-8 JSON") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"{frame.type.name} payload is not a JSON object")
    return obj


def json_frame(ftype: FrameType, channel: int, obj: dict[str, Any]) -> Frame:
    """A control frame carrying ``obj`` as compact JSON."""
    return Frame(ftype, channel, json.dumps(obj, separators=(",", ":")).encode())


def _field(obj: dict[str, Any], key: str, kind: type, what: str, *,
           required: bool = True, default: Any = None) -> Any:
    if key not in obj or obj[key] is None:
        if required:
            raise ProtocolError(f"{what} lacks {key!r}")
        return default
    value = obj[key]
    # bool is an int in Python; the protocol keeps them apart
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{what}: {key!r} is not of type {kind.__name__}")
    return value


def _int_field(obj: dict[str, Any], key: str, what: str, lo: int, hi: int, *,
               required: bool = True) -> int | None:
    value: int | None = _field(obj, key, int, what, required=required)
    if value is not None and not lo <= value <= hi:
        raise ProtocolError(f"{what}: {key!r} = {value} is out of range")
    return value


# ----------------------------------------------------------------- typed messages


def _check_str(value: str, what: str) -> None:
    if "\0" in value:
        raise ValueError(f"{what} contains a NUL character")


@dataclass(frozen=True)
class ExecRequest:
    """What to run in the guest (the payload of EXEC)."""

    argv: Sequence[str]
    env: Sequence[str] = ()
    cwd: str = "/"
    user: str = ""
    tty: bool = False
    stdin: bool = True
    rows: int = 24
    cols: int = 80
    #: Run the tool the host loaded (``AgentClient.load_tool``) instead of a program
    #: of the guest's filesystem; ``argv[0]`` names the applet.
    tool: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.argv, str) or isinstance(self.env, str):
            raise TypeError("argv and env are sequences of strings, not strings")
        if not self.argv:
            raise ValueError("argv must not be empty")
        for a in self.argv:
            _check_str(a, "argv")
        for e in self.env:
            _check_str(e, "env")
            if "=" not in e:
                raise ValueError(f"env entry {e!r} is not of the form KEY=VALUE")
        _check_str(self.cwd, "cwd")
        _check_str(self.user, "user")
        for name, n in (("rows", self.rows), ("cols", self.cols)):
            if not 1 <= n <= 65535:
                raise ValueError(f"{name} = {n} is out of range 1..65535")

    def to_payload(self) -> bytes:
        obj = {
            "argv": list(self.argv), "env": list(self.env), "cwd": self.cwd,
            "user": self.user, "tty": self.tty, "stdin": self.stdin,
            "rows": self.rows, "cols": self.cols,
        }
        if self.tool:  # only then: the payload of any other request is unchanged
            obj["tool"] = True
        return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: an exit code, or the signal that killed it."""

    code: int | None = None
    signal: int | None = None

    @property
    def exit_code(self) -> int:
        """The shell's view: the code, or 128 + the signal number."""
        if self.signal is not None:
            return 128 + self.signal
        return self.code if self.code is not None else 0

    def __str__(self) -> str:
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        return f"exited with code {self.code}"

    @classmethod
    def from_payload(cls, obj: dict[str, Any]) -> ExitStatus:
        code = _int_field(obj, "code", "EXIT", 0, 255, required=False)
        signal = _int_field(obj, "signal", "EXIT", 1, 127, required=False)
        if (code is None) == (signal is None):
            raise ProtocolError("EXIT needs exactly one of 'code' and 'signal'")
        return cls(code=code, signal=signal)


@dataclass(frozen=True)
class ReadyInfo:
    """The agent's READY answer to HELLO."""

    version: int
    agent: str
    kernel: str
    uptime_ms: int
    #: Whether the agent holds a tool already (a host that reconnects need not send
    #: it again); None: the agent cannot load one (an older agent).
    tool: bool | None = None
    #: The snapshot this guest was restored from (set by IDENTITY); "" for a booted one.
    restored_from: str = ""
    #: The agent serves from its initramfs until IDENTITY mounts the root
    #: (``ember.late=1``): a booted guest, or one restored from a boot snapshot.
    root_pending: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_payload(cls, obj: dict[str, Any]) -> ReadyInfo:
        version = _int_field(obj, "version", "READY", 0, 1 << 31)
        assert version is not None
        uptime = _int_field(obj, "uptime_ms", "READY", 0, 1 << 62, required=False)
        known = {"version", "agent", "kernel", "uptime_ms", "tool", "restored_from",
                 "root_pending"}
        return cls(
            version=version,
            agent=_field(obj, "agent", str, "READY", required=False, default=""),
            kernel=_field(obj, "kernel", str, "READY", required=False, default=""),
            uptime_ms=uptime or 0,
            tool=_field(obj, "tool", bool, "READY", required=False),
            restored_from=_field(obj, "restored_from", str, "READY", required=False,
                                 default=""),
            root_pending=_field(obj, "root_pending", bool, "READY", required=False,
                                default=False),
            extra={k: v for k, v in obj.items() if k not in known},
        )


@dataclass(frozen=True)
class IdentityDone:
    """The agent's answer to IDENTITY: which parts of the refresh took effect."""

    reseeded: bool
    clock: bool
    machine_id: bool
    rng_error: str = ""

    @classmethod
    def from_payload(cls, obj: dict[str, Any]) -> IdentityDone:
        return cls(
            reseeded=_field(obj, "reseeded", bool, "IDENTITY_DONE"),
            clock=_field(obj, "clock", bool, "IDENTITY_DONE"),
            machine_id=_field(obj, "machine_id", bool, "IDENTITY_DONE", required=False,
                              default=False),
            rng_error=_field(obj, "rng_error", str, "IDENTITY_DONE", required=False,
                             default=""),
        )


@dataclass(frozen=True)
class ToolStatus:
    """The payload of TOOL_STATUS: the agent's answer to the end of a tool load."""

    loaded: bool
    size: int
    message: str = ""

    @classmethod
    def from_payload(cls, obj: dict[str, Any]) -> ToolStatus:
        size = _int_field(obj, "size", "TOOL_STATUS", 0, 1 << 62)
        assert size is not None
        return cls(loaded=_field(obj, "loaded", bool, "TOOL_STATUS"), size=size,
                   message=_field(obj, "message", str, "TOOL_STATUS", required=False,
                                  default=""))


@dataclass(frozen=True)
class ErrorInfo:
    """The payload of an ERROR frame."""

    message: str
    code: int

    @classmethod
    def from_payload(cls, obj: dict[str, Any]) -> ErrorInfo:
        message = _field(obj, "message", str, "ERROR")
        code = _int_field(obj, "code", "ERROR", -(1 << 31), 1 << 31, required=False)
        return cls(message=message, code=code if code is not None else 1)


def started_pid(obj: dict[str, Any]) -> int:
    """The pid of a STARTED payload."""
    pid = _int_field(obj, "pid", "STARTED", 1, (1 << 31) - 1)
    assert pid is not None
    return pid
