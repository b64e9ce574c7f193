"""``GET /v1/events`` against a real EventBus and StateDB (a temporary SQLite file).

The app is driven in-process through ASGI, the way uvicorn drives it (ASGI
2.3: the body is streamed, a departed client shows as ``http.disconnect``),
so a test can act at the exact moment the response headers arrive, or stop
reading as a slow client does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from ember.api.app import create_app
from ember.daemon.events import BACKLOG
from ember.daemon.manager import Manager

#: A guard against a hanging stream; never reached when the code is right.
GUARD = 30.0


@pytest.fixture
def mgr(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EMBER_ACCEL", "tcg")
    m = Manager()
    yield m
    m.db.close()


class Stream:
    """One streamed GET, as the client sees it: status, then the body's lines."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers = asyncio.Event()
        self.lines: asyncio.Queue[bytes] = asyncio.Queue()
        self.gone = asyncio.Event()  # the client disconnected
        self.reading = asyncio.Event()  # cleared: a slow client, the server's send waits
        self.reading.set()
        self._buf = b""

    async def event(self) -> dict[str, Any]:
        return dict(json.loads(await asyncio.wait_for(self.lines.get(), GUARD)))

    async def seqs_until(self, seq: int) -> list[int]:
        got: list[int] = []
        while not got or got[-1] < seq:
            got.append((await self.event())["seq"])
        return got


@asynccontextmanager
async def get(app: Any, query: str = "", *,
              on_headers: Callable[[], Awaitable[None]] | None = None,
              gone_at_headers: bool = False) -> AsyncIterator[Stream]:
    """``GET /v1/events?query``: the stream while the block runs, then a disconnect.

    ``on_headers`` runs when the response headers arrive, before the server's
    ``send`` returns (a client on a slow network); ``gone_at_headers``: the
    client disconnects then, before any of the body.
    """
    s = Stream()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await s.gone.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        if s.gone.is_set():
            return  # what uvicorn does once the client is gone
        if msg["type"] == "http.response.start":
            s.status = msg["status"]
            if on_headers is not None:
                await on_headers()
            s.headers.set()
            if gone_at_headers:
                s.gone.set()
            return
        await s.reading.wait()
        s._buf += msg.get("body", b"")
        *lines, s._buf = s._buf.split(b"\n")
        for line in lines:
            s.lines.put_nowait(line)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "GET", "scheme": "http", "path": "/v1/events",
             "raw_path": b"/v1/events", "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"ember")], "client": None, "server": ("ember.sock", None)}
    task = asyncio.create_task(app(scope, receive, send))
    try:
        await asyncio.wait_for(s.headers.wait(), GUARD)
        assert s.status == 200
        yield s
    finally:
        s.gone.set()
        s.reading.set()
        await asyncio.wait_for(task, GUARD)


class Publisher:
    """Publishes events on its own thread without pause, as busy machines do."""

    def __init__(self, mgr: Manager) -> None:
        self.mgr = mgr
        self.published = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop:
            seq = self.mgr.events.publish("m0", "m", "tick")["seq"]
            with self._cond:
                self.published = seq
                self._cond.notify_all()

    def wait_beyond(self, seq: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.published > seq, GUARD)

    def __enter__(self) -> Publisher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(GUARD)


def test_every_event_after_the_headers_is_delivered_once_in_order(mgr: Manager) -> None:
    app = create_app(mgr)

    async def scenario() -> None:
        with Publisher(mgr) as pub:
            for i in range(20):
                at_headers = 0

                async def headers_arrive() -> None:
                    # The client has the headers: from now on nothing may be missed.
                    # It takes a moment to ask for the body; events go on meanwhile.
                    nonlocal at_headers
                    at_headers = mgr.db.last_event_seq()
                    await asyncio.to_thread(pub.wait_beyond, at_headers + 3)

                query = "" if i % 2 else f"since={max(0, mgr.db.last_event_seq() - 50)}"
                async with get(app, query, on_headers=headers_arrive) as s:
                    got = await s.seqs_until(at_headers + 30)
                assert got[0] <= at_headers + 1, f"missed {got[0] - at_headers - 1} events"
                assert got == list(range(got[0], got[-1] + 1)), "a gap or a duplicate"
                # clients that leave before reading anything leave no subscription behind
                async with get(app, query, gone_at_headers=True):
                    pass
        assert mgr.events.subscribers == 0

    asyncio.run(scenario())


def test_events_overtaken_by_a_later_one_are_not_lost(mgr: Manager) -> None:
    """Two publishers: seq N is assigned first, but N+1 reaches the stream first."""
    app = create_app(mgr)
    entered, hold = threading.Event(), threading.Event()

    def slow_subscriber(ev: dict[str, Any]) -> None:  # subscribed first: delays N's delivery
        if ev["detail"] == "held":
            entered.set()
            assert hold.wait(GUARD)

    mgr.events.subscribe(slow_subscriber)

    async def scenario() -> list[int]:
        async with get(app) as s:
            held = asyncio.create_task(asyncio.to_thread(
                mgr.events.publish, "m0", "m", "tick", "held"))
            assert await asyncio.to_thread(entered.wait, GUARD)  # N has its seq, not sent
            mgr.events.publish("m0", "m", "tick", "overtakes")
            first = await s.event()
            hold.set()
            await held
            mgr.events.publish("m0", "m", "tick", "last")
            return [first["seq"], *await s.seqs_until(3)]

    assert asyncio.run(scenario()) == [1, 2, 3]


def test_a_reader_far_behind_catches_up_from_the_log(mgr: Manager,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ember")
    app = create_app(mgr)
    total = BACKLOG + 500

    def publish_all() -> None:
        for _ in range(total):
            mgr.events.publish("m0", "m", "tick")

    async def scenario() -> list[int]:
        async with get(app, "since=0") as s:
            s.reading.clear()  # the client stops reading
            mgr.events.publish("m0", "m", "tick")  # seq 1: the server now waits in send
            # every push lands while the stream waits: more than its queue holds
            await asyncio.to_thread(publish_all)
            s.reading.set()
            got = await s.seqs_until(total + 1)
            mgr.events.publish("m0", "m", "tick")  # and it follows live again
            got += await s.seqs_until(total + 2)
            return got

    got = asyncio.run(scenario())
    assert "an event reader fell 10000 events behind" in caplog.text  # its queue was dropped
    assert got == list(range(1, total + 3))


def test_since_beyond_the_last_event_means_from_now(mgr: Manager) -> None:
    app = create_app(mgr)
    for _ in range(3):
        mgr.events.publish("m0", "m", "tick")

    async def scenario() -> dict[str, Any]:
        async with get(app, "since=100") as s:
            mgr.events.publish("m0", "m", "after")
            return await s.event()

    ev = asyncio.run(scenario())
    assert (ev["seq"], ev["type"]) == (4, "after")
