"""The daemon's event log: every lifecycle event, persisted, then pushed to subscribers."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ember.daemon.db import StateDB
from ember.util import log


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventBus:
    """Persists each event, then hands it to every live subscriber (any thread)."""

    def __init__(self, db: StateDB) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._subs: list[Callable[[dict[str, Any]], None]] = []

    def publish(self, machine_id: str, machine: str, type: str,
                detail: str | None = None) -> dict[str, Any]:
        t = now()
        with self._lock:
            seq = self._db.add_event(t, machine_id, machine, type, detail)
            ev = {"seq": seq, "time": t, "machine_id": machine_id, "machine": machine,
                  "type": type, "detail": detail}
            subs = list(self._subs)
        for push in subs:
            try:
                push(ev)
            except Exception:  # a broken subscriber must not break the lifecycle
                log.exception("event subscriber failed")
        return ev

    def subscribe(self, push: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Register ``push``; returns the function that unregisters it."""
        with self._lock:
            self._subs.append(push)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._subs.remove(push)
        return unsubscribe

    def since(self, seq: int) -> list[dict[str, Any]]:
        return self._db.events_since(seq)
