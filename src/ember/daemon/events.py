"""The daemon's event log: every lifecycle event, persisted, then pushed to subscribers.

:class:`EventBus` assigns each event its sequence number and writes it to the
database under one lock, and takes the list of subscribers under the same
lock, so a subscriber registered with :meth:`EventBus.subscribe_at` knows
exactly which events it will be handed: every one after the ``seq`` it got.

:class:`Reader` is one client of ``GET /v1/events``. The database is the
truth, live pushes the fast path: a reader replays from the log what it
needs before following, and goes back to the log whenever the live path
cannot be trusted (it fell :data:`BACKLOG` events behind and its queue was
dropped, or a push overtook an earlier one), so it sends every event once,
in order, in bounded memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from ember.daemon.db import StateDB
from ember.util import log

#: Live events a reader may have queued; beyond that it drops them and re-reads the log.
BACKLOG = 10_000
#: Events read from the log at a time.
PAGE = 1_000

Event = dict[str, Any]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventBus:
    """Persists each event, then hands it to every live subscriber (any thread)."""

    def __init__(self, db: StateDB) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._subs: list[Callable[[Event], None]] = []

    def publish(self, machine_id: str, machine: str, type: str,
                detail: str | None = None) -> Event:
        t = now()
        with self._lock:
            seq = self._db.add_event(t, machine_id, machine, type, detail)
            ev = {"seq": seq, "time": t, "machine_id": machine_id, "machine": machine,
                  "type": type, "detail": detail}
            subs = list(self._subs)
        # Pushed outside the lock: two publishers' pushes may arrive out of order.
        for push in subs:
            try:
                push(ev)
            except Exception:  # a broken subscriber must not break the lifecycle
                log.exception("event subscriber failed")
        return ev

    def subscribe(self, push: Callable[[Event], None]) -> Callable[[], None]:
        """Register ``push``; returns the function that unregisters it."""
        return self.subscribe_at(push)[1]

    def subscribe_at(self, push: Callable[[Event], None]) -> tuple[int, Callable[[], None]]:
        """Register ``push``: ``(seq, unsubscribe)``, where every event after ``seq``
        reaches ``push`` and none before it does."""
        with self._lock:
            seq = self._db.last_event_seq()
            self._subs.append(push)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._subs.remove(push)
        return seq, unsubscribe

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    def last_seq(self) -> int:
        return self._db.last_event_seq()

    def since(self, seq: int, limit: int = PAGE) -> list[Event]:
        """Logged events after ``seq``, oldest first, at most ``limit``."""
        return self._db.events_since(seq, limit)


class Reader:
    """One client of the event stream, subscribed (when following) as it is made.

    ``since``: replay the logged events after it first (a ``since`` beyond the
    last event means "from now"); ``None``: only events published from now on.
    Make it on the event loop that iterates :meth:`events`; :meth:`close`
    unsubscribes, whatever became of the iteration.
    """

    def __init__(self, bus: EventBus, since: int | None, follow: bool, *,
                 backlog: int = BACKLOG, page: int = PAGE) -> None:
        self._bus = bus
        self._loop = asyncio.get_running_loop()
        self._follow = follow
        self._backlog = backlog
        self._page = page
        self._queue: deque[Event] = deque()
        self._dropped = False  # the queue overflowed: the log has what it held
        self._wake = asyncio.Event()
        self._closed = False
        if follow:
            self._now, self._unsubscribe = bus.subscribe_at(self._push)
        else:
            self._now, self._unsubscribe = bus.last_seq(), _nothing
        self.start = self._now if since is None else min(since, self._now)

    def close(self) -> None:
        self._closed = True
        self._unsubscribe()
        self._queue.clear()

    def _push(self, ev: Event) -> None:  # any thread
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
            self._loop.call_soon_threadsafe(self._offer, ev)

    def _offer(self, ev: Event) -> None:  # the loop's thread
        if self._closed:
            return
        if len(self._queue) >= self._backlog:
            if not self._dropped:
                log.info("an event reader fell %d events behind: it goes on from the log",
                         len(self._queue))
            self._queue.clear()
            self._dropped = True
        else:
            self._queue.append(ev)
        self._wake.set()

    async def _next(self) -> Event | None:
        """The next live event, or None when some were dropped."""
        while not self._queue and not self._dropped:
            self._wake.clear()
            await self._wake.wait()
        if self._dropped:
            self._dropped = False
            return None
        return self._queue.popleft()

    async def _replay(self, after: int, upto: int | None) -> AsyncIterator[Event]:
        """Logged events after ``after``: at least to ``upto``, or (None) all there are."""
        while upto is None or after < upto:
            batch = await asyncio.to_thread(self._bus.since, after, self._page)
            for ev in batch:
                yield ev
            if len(batch) < self._page:
                return
            after = batch[-1]["seq"]

    async def events(self) -> AsyncIterator[Event]:
        """Every event after :attr:`start` once, in ``seq`` order; following: forever."""
        last = self.start
        async for old in self._replay(last, self._now):
            last = old["seq"]
            yield old
        while self._follow:
            ev = await self._next()
            if ev is not None and ev["seq"] <= last:
                continue  # replayed already
            if ev is None or ev["seq"] > last + 1:
                # Dropped, or overtaken by a later push: the log has what is missing
                # (an event is logged before it is pushed).
                async for old in self._replay(last, None if ev is None else ev["seq"]):
                    last = old["seq"]
                    yield old
                if ev is None or ev["seq"] <= last:
                    continue
            last = ev["seq"]
            yield ev


def _nothing() -> None:
    pass
