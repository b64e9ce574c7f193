"""The host side of the agent channel: :class:`AgentClient` and :class:`Process`.

One reader thread per connection decodes frames and dispatches them; sends
from any thread are serialized by a lock, one whole frame at a time.

Output callbacks run on the reader thread, in order, and must not block on the
agent (e.g. never call ``write_stdin`` from one): the reader is what keeps the
guest's output flowing. Without callbacks a :class:`Process` collects its
output in memory, up to ``output_limit`` bytes per stream (then it keeps
reaping but drops the excess and sets ``truncated``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from ember.agent.protocol import (
    ERROR_FRAMING,
    MAX_CHANNEL,
    MAX_TOOL_SIZE,
    PROTOCOL_VERSION,
    STREAM_CHUNK,
    ErrorInfo,
    ExecRequest,
    ExitStatus,
    Frame,
    FrameDecoder,
    FrameType,
    IdentityDone,
    ReadyInfo,
    ToolStatus,
    encode_frame,
    json_frame,
    json_payload,
    started_pid,
)
from ember.errors import AgentDisconnected, AgentError, ProtocolError
from ember.util import log

OutputCallback = Callable[[bytes], None]

#: Default cap on the output a Process collects per stream when it has no callback.
DEFAULT_OUTPUT_LIMIT = 64 << 20

_RECV_SIZE = 256 * 1024

_GUEST_TYPES = frozenset({FrameType.READY, FrameType.STARTED, FrameType.STDOUT,
                          FrameType.STDERR, FrameType.EXIT, FrameType.ERROR,
                          FrameType.TOOL_STATUS, FrameType.IDENTITY_DONE})


class ExecFailed(AgentError):
    """The process could not be started (program not found, bad cwd, unknown user...).

    ``code`` is what a shell would exit with: 127 when the program was not
    found, 126 otherwise.
    """

    def __init__(self, message: str, code: int) -> None:
        self.message = message
        self.code = code
        super().__init__(message)


class ProcessTimeout(AgentError, TimeoutError):
    """``Process.wait`` timed out; the process still runs."""


def _copy_error(exc: AgentError) -> AgentError:
    """A fresh exception of the same kind (one per raise, one traceback each)."""
    if isinstance(exc, ExecFailed):
        return ExecFailed(exc.message, exc.code)
    return type(exc)(str(exc))


class Process:
    """A process in the guest, on its own channel."""

    def __init__(self, client: AgentClient, channel: int, req: ExecRequest,
                 on_stdout: OutputCallback | None, on_stderr: OutputCallback | None,
                 output_limit: int) -> None:
        self._client = client
        self.channel = channel
        self.request = req
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr
        self._limit = output_limit
        self._out = bytearray()
        self._err = bytearray()
        self.truncated = False
        self._pid: int | None = None
        self._status: ExitStatus | None = None
        self._error: AgentError | None = None
        self._started = threading.Event()
        self._done = threading.Event()
        self._stdin_closed = False

    def __repr__(self) -> str:
        return f"<Process channel={self.channel} pid={self._pid} argv={list(self.request.argv)!r}>"

    @property
    def pid(self) -> int | None:
        """The guest pid, once STARTED arrived."""
        return self._pid

    @property
    def status(self) -> ExitStatus | None:
        """The exit status, once EXIT arrived."""
        return self._status

    @property
    def stdout(self) -> bytes:
        """Output collected so far (only without an ``on_stdout`` callback)."""
        return bytes(self._out)

    @property
    def stderr(self) -> bytes:
        """Error output collected so far (only without an ``on_stderr`` callback)."""
        return bytes(self._err)

    def done(self) -> bool:
        return self._done.is_set()

    # -- requests

    def write_stdin(self, data: bytes) -> None:
        """Send ``data`` to the process's stdin (blocks while the agent applies back-pressure)."""
        if self._stdin_closed:
            raise AgentError(f"stdin of process {self.channel} is closed")
        view = memoryview(data)
        for i in range(0, len(view), STREAM_CHUNK):
            self._client._send(Frame(FrameType.STDIN, self.channel,
                                     bytes(view[i:i + STREAM_CHUNK])))

    def close_stdin(self) -> None:
        """Close the process's stdin (EOF; on a TTY the agent types ^D). Idempotent."""
        if self._stdin_closed:
            return
        self._stdin_closed = True
        self._client._send(Frame(FrameType.STDIN, self.channel, b""))

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process group of the process."""
        self._client._send(json_frame(FrameType.SIGNAL, self.channel, {"signal": int(signum)}))

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal size of a TTY process (the guest sends it SIGWINCH)."""
        self._client._send(json_frame(FrameType.RESIZE, self.channel,
                                      {"rows": int(rows), "cols": int(cols)}))

    def wait_started(self, timeout: float | None = None) -> int:
        """Wait for STARTED and return the pid (raises like :meth:`wait` on failure)."""
        if not self._started.wait(timeout):
            raise ProcessTimeout(f"process {self.channel} did not start within {timeout} s")
        if self._pid is None:
            self.wait(0)
        assert self._pid is not None
        return self._pid

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Wait for the process to exit.

        Raises:
            ExecFailed: it never started.
            AgentDisconnected / ProtocolError: the channel was lost first.
            ProcessTimeout: ``timeout`` passed (the process still runs).
        """
        if not self._done.wait(timeout):
            raise ProcessTimeout(f"process {self.channel} did not exit within {timeout} s")
        if self._status is not None:
            return self._status
        assert self._error is not None
        raise _copy_error(self._error)

    # -- called by the reader thread

    def _deliver(self, ftype: FrameType, data: bytes) -> None:
        cb = self._on_stdout if ftype is FrameType.STDOUT else self._on_stderr
        if cb is not None:
            cb(data)
            return
        buf = self._out if ftype is FrameType.STDOUT else self._err
        room = self._limit - len(buf)
        if len(data) > room:
            self.truncated = True
            data = data[:max(room, 0)]
        buf += data

    def _finish(self, status: ExitStatus | None, error: AgentError | None) -> None:
        if self._done.is_set():
            return
        self._status = status
        self._error = error
        self._started.set()
        self._done.set()


class AgentClient:
    """A connection to one guest agent over a connected stream socket.

    ``on_disconnect`` is called once when the connection is lost or breaks (not
    on :meth:`close`), before any waiting process is released; usually on the
    reader thread. ``output_limit`` caps what each
    callback-less Process collects per stream.
    """

    def __init__(self, sock: socket.socket, *,
                 on_disconnect: Callable[[AgentError], None] | None = None,
                 output_limit: int = DEFAULT_OUTPUT_LIMIT, first_channel: int = 1) -> None:
        self._sock = sock
        sock.settimeout(None)
        self._on_disconnect = on_disconnect
        self._output_limit = output_limit
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()       # guards the state below
        self._procs: dict[int, Process] = {}
        # A reconnecting host (a restarted daemon) starts its channel ids well
        # away from those of the processes an earlier session left running.
        self._channels = itertools.count(first_channel)
        self._failure: AgentError | None = None
        self._closed = False
        self._ready: ReadyInfo | None = None
        self._ready_event = threading.Event()
        self._tool_lock = threading.Lock()  # one tool load at a time
        self._tool_loaded = False
        self._tool_status: ToolStatus | None = None
        self._tool_event = threading.Event()
        self._identity: IdentityDone | ErrorInfo | None = None
        self._identity_event = threading.Event()
        self.last_error: ErrorInfo | None = None
        self._reader = threading.Thread(target=self._read_loop, name="ember-agent-reader",
                                        daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, path: Path, timeout: float, *,
                on_disconnect: Callable[[AgentError], None] | None = None,
                output_limit: int = DEFAULT_OUTPUT_LIMIT) -> AgentClient:
        """Connect to the unix socket at ``path``, retrying until it accepts or ``timeout``.

        Raises:
            AgentError: no connection within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                    raise AgentError(f"cannot connect to the agent socket {path}: "
                                     f"{exc.strerror}") from exc
                if time.monotonic() >= deadline:
                    raise AgentError(f"the agent socket {path} did not accept a connection "
                                     f"within {timeout:g} s") from exc
                time.sleep(0.05)
                continue
            return cls(sock, on_disconnect=on_disconnect, output_limit=output_limit)

    # -- public API

    @property
    def connected(self) -> bool:
        return self._failure is None and not self._closed

    def hello(self, timeout: float, *, resend: float | None = None) -> ReadyInfo:
        """Send HELLO and wait for READY.

        ``resend``: send HELLO again every so many seconds until READY comes. A
        guest restored from a snapshot may lose the first one: its port comes up
        closed, and an answer written before the guest sees the host connect is
        dropped (docs/snapshots-research.md).

        Raises:
            AgentError: no READY within ``timeout`` (or the channel failed).
        """
        with self._lock:
            self._ready_event.clear()
            self._ready = None
        deadline = time.monotonic() + timeout
        while True:
            self._send(json_frame(FrameType.HELLO, 0, {"version": PROTOCOL_VERSION}))
            left = deadline - time.monotonic()
            if self._ready_event.wait(min(left, resend) if resend else left):
                break
            if time.monotonic() >= deadline:
                raise AgentError(f"the agent did not answer HELLO within {timeout:g} s")
        with self._lock:
            if self._ready is not None:
                return self._ready
            failure = self._failure
        raise _copy_error(failure or AgentDisconnected("agent channel closed"))

    def identity(self, *, hostname: str | None, snapshot: str = "",
                 root: dict[str, str] | None = None, timeout: float = 10.0) -> IdentityDone:
        """Give a guest restored from a snapshot its own identity, before any user command.

        Sends 256 bytes of the host's entropy (the agent credits them and reseeds
        the kernel's CRNG), the host's wall clock, ``hostname``, a fresh
        machine-id, and the snapshot it was restored from. ``root``: mount the root
        first (a guest whose READY said ``root_pending``): its writable layer
        (``rw``), and the ``volumes`` and ``shares`` of ``ember.volumes=`` and
        ``ember.shares=``.

        Raises:
            AgentError: the agent refused the refresh, or no answer within ``timeout``.
        """
        payload: dict[str, Any] = {
            "entropy": os.urandom(256).hex(), "machine_id": os.urandom(16).hex(),
        }
        if hostname:
            payload["hostname"] = hostname
        if snapshot:
            payload["snapshot"] = snapshot
        if root is not None:
            payload.update(root)
        with self._lock:
            self._identity_event.clear()
            self._identity = None
        payload["time_ns"] = time.time_ns()
        self._send(json_frame(FrameType.IDENTITY, 0, payload))
        if not self._identity_event.wait(timeout):
            raise AgentError(f"the agent did not confirm its new identity within {timeout:g} s")
        with self._lock:
            answer = self._identity
            failure = self._failure
        if isinstance(answer, ErrorInfo):
            raise AgentError(f"the agent refused its new identity: {answer.message}")
        if answer is None:
            raise _copy_error(failure or AgentDisconnected("agent channel closed"))
        if not answer.reseeded:
            raise AgentError("the guest could not reseed its random number generator"
                             + (f" ({answer.rng_error})" if answer.rng_error else ""))
        return answer

    def exec(self, req: ExecRequest, *, on_stdout: OutputCallback | None = None,
             on_stderr: OutputCallback | None = None) -> Process:
        """Start ``req`` in the guest. Returns at once; ``wait()`` on the result.

        Without callbacks, output is collected in the Process (see ``output_limit``).
        """
        with self._lock:
            self._check_usable()
            channel = next(self._channels)
            while channel in self._procs or channel > MAX_CHANNEL:
                if channel > MAX_CHANNEL:  # wrapped around: reuse ids no longer live
                    self._channels = itertools.count(1)
                channel = next(self._channels)
            proc = Process(self, channel, req, on_stdout, on_stderr, self._output_limit)
            self._procs[channel] = proc
        try:
            self._send(Frame(FrameType.EXEC, channel, req.to_payload()))
        except AgentError:
            with self._lock:
                self._procs.pop(channel, None)
            raise
        return proc

    def attach(self, channel: int, req: ExecRequest, *, on_stdout: OutputCallback | None = None,
               on_stderr: OutputCallback | None = None) -> Process:
        """Follow a process that an earlier connection started on ``channel``.

        The agent sends a live process's output and exit to whichever host is
        connected, so a restarted daemon gets the rest of its output and its
        exit status (output produced while no host was connected is lost). If
        the process is long gone, the result never finishes: callers pair this
        with a liveness check of their own.
        """
        with self._lock:
            self._check_usable()
            if channel in self._procs:
                raise AgentError(f"channel {channel} is already in use")
            proc = Process(self, channel, req, on_stdout, on_stderr, self._output_limit)
            proc._started.set()
            self._procs[channel] = proc
        return proc

    @property
    def tool_loaded(self) -> bool:
        """Whether the agent holds a tool (loaded on this connection, or READY said so)."""
        ready = self._ready
        return self._tool_loaded or (ready is not None and ready.tool is True)

    def load_tool(self, data: bytes, timeout: float = 60.0) -> None:
        """Give the agent the tool that ``ExecRequest(tool=True)`` runs (a static binary).

        Idempotent per connection: nothing is sent once a load succeeded or the
        agent's READY said it holds a tool already (the agent keeps it across
        host connections). Safe to call from several threads; loads never interleave.

        Raises:
            AgentError: before :meth:`hello`, the agent is too old to take a tool,
                it refused this one (the message says why), or no answer in ``timeout``.
            ValueError: ``data`` is empty or larger than ``MAX_TOOL_SIZE``.
        """
        if not data or len(data) > MAX_TOOL_SIZE:
            raise ValueError(f"a tool is 1..{MAX_TOOL_SIZE} bytes, not {len(data)}")
        with self._tool_lock:
            if self.tool_loaded:
                return
            ready = self._ready
            if ready is None:
                raise AgentError("load_tool before the agent answered HELLO")
            if ready.tool is None:
                raise AgentError(f"the guest agent ({ready.agent or 'unknown'}) cannot load "
                                 "a tool: it predates the TOOL frame")
            self._tool_event.clear()
            self._tool_status = None
            view = memoryview(data)
            for i in range(0, len(view), STREAM_CHUNK):
                self._send(Frame(FrameType.TOOL, 0, bytes(view[i:i + STREAM_CHUNK])))
            self._send(Frame(FrameType.TOOL, 0, b""))
            if not self._tool_event.wait(timeout):
                raise AgentError(f"the agent did not confirm the tool within {timeout:g} s")
            with self._lock:
                status = self._tool_status
                failure = self._failure
            if status is None:
                raise _copy_error(failure or AgentDisconnected("agent channel closed"))
            if not status.loaded:
                raise AgentError(f"the agent refused the tool: {status.message}")
            if status.size != len(data):
                raise AgentError(f"the agent loaded {status.size} bytes of a "
                                 f"{len(data)}-byte tool")
            self._tool_loaded = True

    def shutdown(self) -> None:
        """Ask the guest to power off (in test mode: the agent exits)."""
        self._send(json_frame(FrameType.SHUTDOWN, 0, {}))

    def close(self) -> None:
        """Close the connection; waiting processes get AgentDisconnected. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._fail(AgentDisconnected("agent connection closed"))
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise _copy_error(self._failure)
        if self._closed:
            raise AgentDisconnected("agent connection closed")

    def _send(self, frame: Frame) -> None:
        data = encode_frame(frame)
        with self._send_lock:
            with self._lock:
                self._check_usable()
            try:
                self._sock.sendall(data)
            except OSError as exc:
                err = AgentDisconnected(f"agent channel closed while sending: {exc}")
                self._fail(err)
                raise _copy_error(err) from exc

    def _fail(self, exc: AgentError) -> None:
        """Fail the connection once: release every waiter, call the hook."""
        with self._lock:
            if self._failure is not None:
                return
            self._failure = exc
            procs = list(self._procs.values())
            self._procs.clear()
            first_close = not self._closed
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        # The hook runs before any waiter is released: whoever sees a process
        # fail with AgentDisconnected can rely on the hook having run.
        if self._on_disconnect is not None and first_close:
            try:
                self._on_disconnect(exc)
            except Exception:  # a hook must not kill the reader
                log.exception("agent on_disconnect hook failed")
        for p in procs:
            p._finish(None, exc)
        self._ready_event.set()
        self._tool_event.set()
        self._identity_event.set()

    def _read_loop(self) -> None:
        decoder = FrameDecoder()
        try:
            while True:
                try:
                    data = self._sock.recv(_RECV_SIZE)
                except OSError as exc:
                    self._fail(AgentDisconnected(f"agent channel closed: {exc}"))
                    return
                if not data:
                    self._fail(AgentDisconnected("agent channel closed"))
                    return
                for frame in decoder.feed(data):
                    if self._closed:
                        return
                    self._dispatch(frame)
        except ProtocolError as exc:
            log.debug("agent protocol error: %s", exc)
            self._fail(ProtocolError(f"agent protocol error: {exc}"))
        except Exception as exc:  # a callback raised: keep the invariant, fail cleanly
            log.exception("agent reader failed")
            self._fail(AgentError(f"agent reader failed: {exc!r}"))

    def _dispatch(self, frame: Frame) -> None:
        ftype = frame.type
        if ftype not in _GUEST_TYPES:
            raise ProtocolError(f"unexpected {ftype.name} frame from the guest")
        if frame.channel == 0:
            self._dispatch_control(frame)
            return
        with self._lock:
            proc = self._procs.get(frame.channel)
        if proc is None:
            # e.g. output of a process started by an earlier session
            log.debug("agent: %s for unknown channel %d dropped", ftype.name, frame.channel)
            return
        if ftype in (FrameType.STDOUT, FrameType.STDERR):
            proc._deliver(ftype, frame.payload)
        elif ftype is FrameType.STARTED:
            proc._pid = started_pid(json_payload(frame))
            proc._started.set()
        elif ftype is FrameType.EXIT:
            status = ExitStatus.from_payload(json_payload(frame))
            self._release(proc)
            proc._finish(status, None)
        elif ftype is FrameType.ERROR:
            info = ErrorInfo.from_payload(json_payload(frame))
            self._release(proc)
            proc._finish(None, ExecFailed(info.message, info.code))
        else:
            raise ProtocolError(f"{ftype.name} frame on process channel {frame.channel}")

    def _release(self, proc: Process) -> None:
        with self._lock:
            if self._procs.get(proc.channel) is proc:
                del self._procs[proc.channel]

    def _dispatch_control(self, frame: Frame) -> None:
        if frame.type is FrameType.READY:
            info = ReadyInfo.from_payload(json_payload(frame))
            with self._lock:
                self._ready = info
            self._ready_event.set()
        elif frame.type is FrameType.TOOL_STATUS:
            status = ToolStatus.from_payload(json_payload(frame))
            with self._lock:
                self._tool_status = status
            self._tool_event.set()
        elif frame.type is FrameType.IDENTITY_DONE:
            done = IdentityDone.from_payload(json_payload(frame))
            with self._lock:
                self._identity = done
            self._identity_event.set()
        elif frame.type is FrameType.ERROR:
            err = ErrorInfo.from_payload(json_payload(frame))
            self.last_error = err
            if err.code == ERROR_FRAMING:
                raise ProtocolError(f"the agent lost the framing: {err.message}")
            if err.message.startswith(("bad IDENTITY", "IDENTITY")):
                with self._lock:
                    self._identity = err
                self._identity_event.set()
            log.warning("agent: %s", err.message)
        else:
            raise ProtocolError(f"{frame.type.name} frame on channel 0")
