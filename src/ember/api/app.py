"""The REST API: FastAPI routes over the daemon's :class:`~ember.daemon.manager.Manager`.

The routes are thin: validate (pydantic models in ``ember.api.models``), call
the manager on a worker thread, render. Every error leaves as
``{"error": {"code", "message"}}`` with a 4xx status for anything the client
did (bad JSON 400, unknown name 404, wrong state or name taken 409, schema
violations 422); a 500 means a bug of ours, and says so in one line.

Streams (exec output, logs, events) are NDJSON or raw bytes, written as they
come; an exec whose client goes away is killed, so no process outlives its
request unseen. Request bodies and a TCP client's open streams are bounded
(``api/limits.py``: 413, 429).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ember import __version__
from ember.api import models
from ember.api.egress import add_egress_routes
from ember.api.images import add_image_routes
from ember.api.limits import STREAM_ROUTES, STREAMS_PER_CLIENT, BodyLimit, StreamLimit, spool
from ember.api.metrics import add_metrics_routes
from ember.api.ndjson import line as _line
from ember.api.snapshots import add_snapshot_routes
from ember.api.stats import add_stats_routes
from ember.api.volumes import add_volume_routes
from ember.daemon import egress
from ember.daemon.errors import Invalid, ManagerError
from ember.daemon.events import Reader
from ember.daemon.logs import LogFollower, LogView
from ember.daemon.managed import Managed
from ember.daemon.manager import Manager
from ember.daemon.states import ACTIVE
from ember.errors import AgentError, EmberError, MachineCrashed
from ember.files import CopyError
from ember.util import log, parse_signal

if TYPE_CHECKING:
    from ember.agent.client import Process

T = TypeVar("T")

#: Output bytes an exec may have in flight to a slow client before the guest is slowed.
STREAM_WINDOW = 4 << 20
#: Seconds a stream's writer waits for a client that stopped reading before dropping its output.
STREAM_STALL = 10.0

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": models.Error, "description": "Malformed request (e.g. invalid JSON)"},
    404: {"model": models.Error, "description": "No such machine, image, snapshot or volume"},
    409: {"model": models.Error, "description": "Wrong state, name taken, resource in use"},
    413: {"model": models.Error, "description": "The request body is larger than the "
                                                "endpoint's limit (docs/api.md)"},
    422: {"model": models.Error, "description": "The request does not match the schema"},
    500: {"model": models.Error, "description": "A bug in Ember"},
}


def _error(status: int, code: str, message: str) -> JSONResponse:
    message = " ".join(message.split()) or code  # one line, whatever the client sent
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _validation_message(exc: RequestValidationError | ValidationError) -> tuple[int, str, str]:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return 400, "bad_request", "request body is not valid JSON"
    parts = []
    for e in errs[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (and {len(errs) - 3} more)" if len(errs) > 3 else ""
    return 422, "invalid", "; ".join(parts) + more


class _Pipe:
    """Thread-to-coroutine byte queue with a window: writers wait while it is full.

    The writer is the agent's reader thread, shared by every process of the
    machine: a client that stops reading must not stall the others for long.
    After ``stall`` seconds without room the pipe gives up on that client's
    output (``overflowed``; later data is dropped, control items still pass).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, window: int = STREAM_WINDOW,
                 stall: float = STREAM_STALL) -> None:
        self._loop = loop
        self._q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._cond = threading.Condition()
        self._pending = 0
        self._window = window
        self._stall = stall
        self._closed = False
        self.overflowed = False

    def put(self, kind: str, item: Any, size: int = 0) -> None:
        with self._cond:
            deadline = time.monotonic() + self._stall
            while self._pending > self._window and not self._closed and not self.overflowed:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.overflowed = True
                    break
                self._cond.wait(min(left, 0.5))
            if self._closed or (self.overflowed and size):
                return
            self._pending += size
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
            self._loop.call_soon_threadsafe(self._q.put_nowait, (kind, item))

    def writer(self, kind: str) -> Callable[[bytes], None]:
        return lambda data: self.put(kind, data, len(data))

    async def get(self) -> tuple[str, Any]:
        kind, item = await self._q.get()
        if isinstance(item, bytes | bytearray):
            with self._cond:
                self._pending -= len(item)
                self._cond.notify_all()
        return kind, item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def hang_up(self) -> None:
        """Wake the reader with a ``("gone", None)`` item (on the event loop's thread)."""
        self._q.put_nowait(("gone", None))


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking ``fn`` on a thread of its own and await its result.

    Not the shared worker pool: an exec waits as long as its process runs and a
    stop as long as its timeout, and a few dozen of those would otherwise hold
    every pool thread and stall unrelated requests (measured: 45 waiting execs
    made ``GET /v1/version`` take 4.6 s). A thread costs ~0.1 ms to start.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def work() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting coroutine
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, False, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, True, result)

    threading.Thread(target=work, daemon=True, name="ember-api-call").start()
    return await fut


def _drop(_: bytes) -> None:
    """Output nobody reads (a detached exec's)."""


def _finish(proc: Process, stdin: bytes | None, timeout: float | None) -> dict[str, Any]:
    """Feed stdin, wait for the exit (killing at ``timeout``); the exit as an event dict."""
    from ember.agent.client import ExecFailed, ProcessTimeout

    try:
        if stdin is not None:
            if stdin:
                proc.write_stdin(stdin)
            proc.close_stdin()
        try:
            st = proc.wait(timeout)
            return {"type": "exit", "exit_code": st.exit_code, "signal": st.signal,
                    "timed_out": False}
        except ProcessTimeout:
            proc.signal(signal.SIGKILL)
            st = proc.wait(10)
            return {"type": "exit", "exit_code": st.exit_code, "signal": st.signal,
                    "timed_out": True}
    except ExecFailed as exc:
        return {"type": "error", "message": exc.message, "exit_code": exc.code}
    except AgentError as exc:
        return {"type": "error", "message": f"machine stopped: {exc}", "exit_code": 137}


def _kill(proc: Process) -> None:
    """SIGKILL ``proc`` (its process group) from a thread of its own, never on the event loop.

    A send to the agent can block for as long as the guest leaves its stdin
    unread (the agent stops reading its port while a process has 1 MiB of
    stdin pending), and a blocked event loop would stall every client.
    """
    def work() -> None:
        with contextlib.suppress(AgentError):
            proc.signal(signal.SIGKILL)

    threading.Thread(target=work, daemon=True, name="ember-exec-kill").start()


async def _disconnected(request: Request) -> None:
    """Return once the client of ``request`` (its body already read) has gone away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(mgr: Manager, *, streams_per_client: int = STREAMS_PER_CLIENT) -> FastAPI:
    app = FastAPI(title="Ember", version=__version__, responses=_ERRORS,
                  description="Micro virtual machines from OCI images. One daemon per host; "
                              "see docs/api.md.")
    app.add_middleware(BodyLimit)
    app.add_middleware(StreamLimit, per_client=streams_per_client)  # outside: counted first

    async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await in_thread(fn, *args, **kwargs)

    # --- errors

    @app.exception_handler(ManagerError)
    async def _manager_error(_: Request, exc: ManagerError) -> JSONResponse:
        return _error(exc.status, exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(*_validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized",
                413: "too_large", 429: "too_many_streams"}.get(exc.status_code, "error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(CopyError)
    async def _copy(_: Request, exc: CopyError) -> JSONResponse:
        from ember.files import GuestNotADirectory, GuestPathNotFound

        if isinstance(exc, GuestPathNotFound):
            return _error(404, "not_found", str(exc))
        if isinstance(exc, GuestNotADirectory):
            return _error(409, "conflict", str(exc))
        return _error(422, "invalid", str(exc))

    @app.exception_handler(MachineCrashed)
    async def _crashed(_: Request, exc: MachineCrashed) -> JSONResponse:
        return _error(500, "machine_crashed", str(exc))

    @app.exception_handler(EmberError)
    async def _ember(_: Request, exc: EmberError) -> JSONResponse:
        return _error(400, "failed", str(exc))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error(500, "internal", f"internal error: {exc!r}"[:500])

    def machine(mm: Managed) -> models.Machine:
        data = mm.public()
        if data.get("pid") and mm.state in ACTIVE:
            from ember.vmm.launch import confinement

            data["confinement"] = confinement(data["pid"], mm.state_dir)
        data["egress_denied"] = mm.egress_denied()  # as last read: no process here
        return models.Machine.model_validate(data)

    # --- version

    @app.get("/v1/version", response_model=models.Version, tags=["system"])
    def version() -> models.Version:
        return models.Version(version=__version__, api=models.API_VERSION,
                              accel=mgr.accel.name, accel_reason=mgr.accel.reason)

    add_image_routes(app, mgr, call)
    add_volume_routes(app, mgr, call)
    add_metrics_routes(app, mgr)
    add_stats_routes(app, mgr, call)

    # --- machines

    @app.post("/v1/machines", response_model=models.Machine, status_code=201,
              tags=["machines"])
    async def create_machine(body: models.MachineCreate) -> models.Machine:
        return machine(await call(mgr.create, body))

    @app.get("/v1/machines", response_model=list[models.Machine], tags=["machines"])
    async def list_machines(all: bool = True) -> list[models.Machine]:
        return [machine(mm) for mm in mgr.all() if all or mm.state in ACTIVE]

    @app.get("/v1/machines/{name}", response_model=models.Machine, tags=["machines"])
    async def get_machine(name: str) -> models.Machine:
        """The machine's record; `egress_denied` is read afresh (the list's is the egress
        watcher's, at most 5 s old)."""
        mm = mgr.get(name)
        if mm.machine is not None and mm.state in egress.LIVE:  # it runs a process
            await call(egress.refresh, mm)
        return machine(mm)

    async def action(name: str, fn: Callable[[Managed], None]) -> models.Machine:
        mm = mgr.get(name)
        await call(fn, mm)
        return machine(mm)

    @app.post("/v1/machines/{name}/start", response_model=models.Machine, tags=["machines"])
    async def start_machine(name: str) -> models.Machine:
        return await action(name, lambda mm: mm.start())

    @app.post("/v1/machines/{name}/stop", response_model=models.Machine, tags=["machines"])
    async def stop_machine(
        name: str,
        timeout: Annotated[float, Query(ge=0, le=3600,
                                        description="Seconds the main process gets after "
                                                    "SIGTERM before the machine is powered "
                                                    "off.")] = 10.0,
    ) -> models.Machine:
        return await action(name, lambda mm: mm.stop(timeout))

    @app.post("/v1/machines/{name}/kill", response_model=models.Machine, tags=["machines"])
    async def kill_machine(
        name: str,
        signal: Annotated[str, Query(max_length=16, pattern=r"^[A-Za-z0-9]+$",
                                     description="SIGKILL (default) powers the machine off "
                                                 "at once (exit code 137); any other signal "
                                                 "(a name or number) goes to the main "
                                                 "process.")] = "SIGKILL",
    ) -> models.Machine:
        try:
            signum = parse_signal(signal)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        return await action(name, lambda mm: mm.kill(signum))

    @app.post("/v1/machines/{name}/restart", response_model=models.Machine, tags=["machines"])
    async def restart_machine(
        name: str,
        timeout: Annotated[float, Query(ge=0, le=3600,
                                        description="As for stop.")] = 10.0,
    ) -> models.Machine:
        return await action(name, lambda mm: mm.restart(timeout))

    @app.post("/v1/machines/{name}/rename", response_model=models.Machine, tags=["machines"])
    async def rename_machine(name: str, body: models.MachineRename) -> models.Machine:
        return await action(name, lambda mm: mgr.rename(mm, body.name))

    @app.post("/v1/machines/{name}/wait", response_model=models.WaitResult, tags=["machines"])
    async def wait_machine(name: str, request: Request) -> models.WaitResult:
        """Wait until the machine is not starting, running, paused or stopping (at once
        if it is not); how it ended. The wait ends with the client's connection."""
        mm = mgr.get(name)
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def push(ev: dict[str, Any]) -> None:
            if ev["machine_id"] == mm.id:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(changed.set)

        unsubscribe = mgr.events.subscribe(push)
        try:
            while True:
                doc = mm.public()  # read after subscribing: no change goes unseen
                if mm.deleted or doc["state"] not in ACTIVE:
                    return models.WaitResult(state=doc["state"], exit_code=doc["exit_code"],
                                             reason=doc["reason"])
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), 1.0)
                changed.clear()
                if await request.is_disconnected():  # nobody waits any more
                    raise asyncio.CancelledError
        finally:
            unsubscribe()

    @app.post("/v1/machines/{name}/pause", response_model=models.Machine, tags=["machines"])
    async def pause_machine(name: str) -> models.Machine:
        return await action(name, lambda mm: mm.pause())

    @app.post("/v1/machines/{name}/resume", response_model=models.Machine, tags=["machines"])
    async def resume_machine(name: str) -> models.Machine:
        return await action(name, lambda mm: mm.resume())

    @app.delete("/v1/machines/{name}", status_code=204, tags=["machines"])
    async def delete_machine(name: str, force: bool = False) -> Response:
        mm = mgr.get(name)
        await call(mm.remove, force)
        return Response(status_code=204)

    add_snapshot_routes(app, mgr, call, machine)
    add_egress_routes(app, mgr, call, machine)

    # --- exec

    @app.post("/v1/machines/{name}/exec/detach", response_model=models.ExecStarted,
              status_code=201, tags=["exec"])
    async def exec_detached(name: str, body: models.ExecCreate) -> models.ExecStarted:
        """Start a process and leave it running (`ember exec -d`): its output is dropped,
        its stdin empty; it ends by itself or with the machine."""
        if body.tty or body.stdin is not None or body.timeout is not None:
            raise Invalid("a detached exec takes no tty, stdin or timeout")
        mm = mgr.get(name)

        def run() -> int:
            proc = mm.exec(body, on_stdout=_drop, on_stderr=_drop)
            try:
                return proc.wait_started(30)
            except AgentError as exc:
                raise ManagerError(f"machine {mm.name}: {exc}") from None

        return models.ExecStarted(pid=await call(run))

    @app.post("/v1/machines/{name}/exec", response_model=models.ExecResult, tags=["exec"])
    async def exec_buffered(name: str, body: models.ExecCreate,
                            request: Request) -> models.ExecResult | Response:
        mm = mgr.get(name)
        stdin = body.stdin.encode() if body.stdin is not None else None
        started: list[Process] = []
        gone = threading.Event()

        def run() -> dict[str, Any]:  # one thread for start and wait: one hand-off
            started.append(mm.exec(body))
            if gone.is_set():  # the client left while the process was starting
                _kill(started[0])
            return _finish(started[0], stdin, body.timeout)

        work = asyncio.ensure_future(call(run))
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            abandoned = not work.done()
            if abandoned:  # the client went away (or we were cancelled): so does the process
                gone.set()
                if started:
                    _kill(started[0])
                work.cancel()
        if abandoned:  # nobody reads an answer: 499, as proxies log a closed request
            return Response(status_code=499)
        end = work.result()
        proc = started[0]
        if end["type"] == "error":
            return models.ExecResult(exit_code=end["exit_code"], stdout="",
                                     stderr=end["message"] + "\n")
        return models.ExecResult(
            exit_code=end["exit_code"], signal=end["signal"], timed_out=end["timed_out"],
            stdout=proc.stdout.decode(errors="replace"),
            stderr=proc.stderr.decode(errors="replace"), truncated=proc.truncated)

    @app.post("/v1/machines/{name}/exec/stream", tags=["exec"],
              responses={200: {"description": "One ExecEvent per line",
                               "content": {"application/x-ndjson": {
                                   "schema": {"$ref": "#/components/schemas/ExecEvent"}}}}},
              response_class=StreamingResponse)
    async def exec_stream(name: str, body: models.ExecCreate) -> StreamingResponse:
        mm = mgr.get(name)
        mm.check_running("exec")  # a 409 while a status can still be sent
        pipe = _Pipe(asyncio.get_running_loop())
        stdin = body.stdin.encode() if body.stdin is not None else None

        async def events() -> AsyncIterator[bytes]:
            # The process starts here, once the response streams: a client gone
            # before then never runs this generator, and nothing would read or
            # stop a process started earlier.
            done = False
            proc: Process | None = None
            try:
                try:
                    proc = await call(mm.exec, body, on_stdout=pipe.writer("stdout"),
                                      on_stderr=pipe.writer("stderr"))
                except ManagerError as exc:  # the machine stopped meanwhile
                    done = True
                    yield _line({"type": "error", "message": str(exc), "exit_code": 125})
                    return
                started = proc

                def waiter() -> None:
                    pipe.put("end", _finish(started, stdin, body.timeout))

                threading.Thread(target=waiter, daemon=True, name="ember-exec-wait").start()
                with contextlib.suppress(AgentError):
                    pid = await call(proc.wait_started, 30)
                    yield _line({"type": "started", "pid": pid})
                while True:
                    kind, item = await pipe.get()
                    if kind == "end":
                        done = True
                        if pipe.overflowed:
                            item["truncated"] = True
                        yield _line(item)
                        return
                    yield _line({"type": kind, "data": base64.b64encode(item).decode()})
            finally:
                pipe.close()
                if proc is not None and not done:  # the client went away: so does the process
                    _kill(proc)

        return StreamingResponse(events(), media_type="application/x-ndjson")

    @app.websocket("/v1/machines/{name}/exec/ws")
    async def exec_ws(ws: WebSocket, name: str) -> None:
        await ws.accept()
        try:
            body = models.ExecCreate.model_validate_json(await ws.receive_text())
            mm = mgr.get(name)
        except (ValidationError, ManagerError) as exc:
            msg = _validation_message(exc)[2] if isinstance(exc, ValidationError) else str(exc)
            await ws.send_text(json.dumps({"type": "error", "message": msg, "exit_code": 125}))
            await ws.close(code=1008)
            return
        except WebSocketDisconnect:
            return
        pipe = _Pipe(asyncio.get_running_loop())
        try:
            proc = await call(mm.exec, body, on_stdout=pipe.writer("stdout"),
                              on_stderr=pipe.writer("stderr"), stdin=True)
        except ManagerError as exc:
            await ws.send_text(json.dumps({"type": "error", "message": str(exc),
                                           "exit_code": 125}))
            await ws.close(code=1008)
            return
        threading.Thread(target=lambda: pipe.put("end", _finish(proc, None, body.timeout)),
                         daemon=True).start()

        async def pump_in() -> None:
            """Client to process, one message at a time: while the guest is slow to read
            its stdin, ``write_stdin`` blocks, nothing more is received, and the client's
            sends wait (uvicorn stops reading the socket): no buffering here."""
            try:
                while True:
                    msg = await ws.receive()
                    if msg["type"] == "websocket.disconnect":
                        return
                    with contextlib.suppress(AgentError):  # exited meanwhile, or stdin closed
                        if msg.get("bytes"):
                            await call(proc.write_stdin, msg["bytes"])
                        elif msg.get("text"):
                            await control(msg["text"])
            finally:
                pipe.hang_up()  # the client is gone (or unreadable): stop the session

        async def control(text: str) -> None:
            try:
                ctl = json.loads(text)
                kind = ctl.get("type")
                if kind == "eof":
                    await call(proc.close_stdin)
                elif kind == "resize":
                    await call(proc.resize, int(ctl["rows"]), int(ctl["cols"]))
                elif kind == "signal":
                    await call(proc.signal, int(ctl["signal"]))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                # a malformed control message is ignored, the session goes on
                log.debug("exec ws: bad control message: %s", exc)

        reader = asyncio.create_task(pump_in())
        done = False
        try:
            while True:
                kind, item = await pipe.get()
                if kind == "gone":
                    break
                if kind == "end":
                    done = True
                    if pipe.overflowed:
                        item["truncated"] = True
                    await ws.send_text(json.dumps(item))
                    break
                await ws.send_bytes((b"\x01" if kind == "stdout" else b"\x02") + item)
            with contextlib.suppress(Exception):
                await ws.close()
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            reader.cancel()
            pipe.close()
            if not done:  # the client went away: so does the process
                _kill(proc)

    # --- logs

    @app.get("/v1/machines/{name}/logs", tags=["machines"], response_class=StreamingResponse,
             responses={200: {"description": "Raw log bytes",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def logs(
        name: str,
        source: Literal["output", "console"] = "output",
        follow: bool = False,
        tail: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
        since: Annotated[float | None, Query(ge=0, le=1e11,
                                             description="Only lines that arrived at or "
                                                         "after this time (Unix seconds); "
                                                         "output only.")] = None,
        timestamps: Annotated[bool, Query(description="Prefix each line with the time it "
                                                      "arrived (RFC 3339, UTC); output "
                                                      "only.")] = False,
    ) -> StreamingResponse:
        mm = mgr.get(name)
        if source == "console" and (since is not None or timestamps):
            raise Invalid("since and timestamps are for source=output: the console log "
                          "records no times")
        path = mm.output_path if source == "output" else mm.console_path
        view = LogView(since_ns=int(since * 1e9) if since is not None else None,
                       timestamps=timestamps, tail=tail)

        async def stream() -> AsyncIterator[bytes]:
            follower = LogFollower(path, view)
            data = await call(follower.history)  # up to where following starts
            if data:
                yield data
            if not follow:
                return
            while True:
                await asyncio.sleep(0.2)
                chunk = await call(follower.poll)
                if chunk:
                    yield chunk
                elif mm.deleted or mm.state not in ACTIVE:
                    return

        return StreamingResponse(stream(), media_type="text/plain")

    # --- files

    @app.get("/v1/machines/{name}/files", tags=["files"],
             responses={200: {"description": "A tar archive of the file or directory",
                              "content": {"application/x-tar": {
                                  "schema": {"type": "string", "format": "binary"}}}}})
    async def get_files(name: str, path: Annotated[str, Query(pattern=r"^/", max_length=4096)]
                        ) -> Response:
        from ember import files

        mm = mgr.get(name)
        m = await call(mm.running_machine, "copying files from it")
        data = await call(files.get_archive, m, path)
        return Response(content=data, media_type="application/x-tar")

    @app.put("/v1/machines/{name}/files", status_code=204, tags=["files"],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/x-tar": {"schema": {"type": "string", "format": "binary"}}}}})
    async def put_files(request: Request, name: str,
                        path: Annotated[str, Query(pattern=r"^/", max_length=4096)]) -> Response:
        from ember import files

        mm = mgr.get(name)
        # To a file, not memory: an archive may be as large as BodyLimit lets it (2 GiB).
        with tempfile.TemporaryFile(dir=mgr.uploads_dir, prefix="files-") as body:
            await spool(request.stream(), lambda data: call(body.write, data))
            body.seek(0)
            m = await call(mm.running_machine, "copying files into it")
            await call(files.put_archive, m, path, body)
        return Response(status_code=204)

    # --- events

    @app.get("/v1/events", tags=["system"], response_class=StreamingResponse,
             responses={200: {"description": "One Event per line",
                              "content": {"application/x-ndjson": {
                                  "schema": {"$ref": "#/components/schemas/Event"}}}}})
    async def events(
        since: Annotated[int | None, Query(ge=0, le=2**63 - 1,  # SQLite's INTEGER
                                           description="Replay the logged events after this "
                                                       "seq first (beyond the last one: "
                                                       "from now); default: only new ones"
                                           )] = None,
        follow: bool = True,
    ) -> StreamingResponse:
        # Subscribed now, before the headers go out: a client that has them misses
        # nothing. _EventStream unsubscribes however the response ends.
        return _EventStream(Reader(mgr.events, since, follow))

    # --- the OpenAPI document: our error body for 422 too, and the shared schemas

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description,
                          routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in (models.ExecEvent, models.Event, models.Error, models.ErrorBody):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in schema.pop("$defs", {}).items():
                schemas.setdefault(name, sub)
            schemas[model.__name__] = schema
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        for route, path in doc.get("paths", {}).items():
            for op in path.values():
                resp = op.get("responses", {})
                if "422" in resp:
                    resp["422"] = {"description": _ERRORS[422]["description"],
                                   "content": error_ref}
                if STREAM_ROUTES.fullmatch(route):
                    resp["429"] = {"description": "Too many streams open: a TCP client may "
                                   f"have {streams_per_client} at once", "content": error_ref}
        app.openapi_schema = jsonable_encoder(doc)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


class _EventStream(StreamingResponse):
    """The NDJSON lines of a :class:`Reader`, which is closed when the response ends.

    Also when the client went away before the body started: then the body's
    generator never runs, and a ``finally`` of its own would never run either.
    """

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        super().__init__(self._lines(), media_type="application/x-ndjson")

    async def _lines(self) -> AsyncIterator[bytes]:
        async for ev in self.reader.events():
            yield _line(ev)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.reader.close()
