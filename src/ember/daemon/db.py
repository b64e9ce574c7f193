"""The daemon's durable state: machines and their event log, in SQLite (WAL).

One connection, shared by the daemon's threads behind a lock. Every change
is one transaction, so a daemon killed at any moment leaves either the old
record or the new one, never half of each. A machine's record is its API
representation (``ember.api.models.Machine``) plus a few private fields the
daemon needs to re-adopt it, as one JSON document.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS machines (
    id    TEXT PRIMARY KEY,
    name  TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    doc   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    time       TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    machine    TEXT NOT NULL,
    type       TEXT NOT NULL,
    detail     TEXT
);
"""

#: Events kept in the log; older ones are pruned.
MAX_EVENTS = 10_000


class StateDB:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        path.chmod(0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- machines

    def put_machine(self, doc: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO machines (id, name, state, doc) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET name=excluded.name, state=excluded.state, "
                "doc=excluded.doc",
                (doc["id"], doc["name"], doc["state"], json.dumps(doc)))

    def delete_machine(self, machine_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM machines WHERE id = ?", (machine_id,))

    def machines(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT doc FROM machines ORDER BY rowid").fetchall()
        return [json.loads(r[0]) for r in rows]

    # --- events

    def add_event(self, time: str, machine_id: str, machine: str, type: str,
                  detail: str | None) -> int:
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO events (time, machine_id, machine, type, detail) "
                "VALUES (?, ?, ?, ?, ?)", (time, machine_id, machine, type, detail))
            seq = cur.lastrowid
            assert seq is not None
            if seq % 1000 == 0:
                self._db.execute("DELETE FROM events WHERE seq <= ?", (seq - MAX_EVENTS,))
        return seq

    def events_since(self, seq: int, limit: int = MAX_EVENTS) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, time, machine_id, machine, type, detail FROM events "
                "WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
        return [dict(zip(("seq", "time", "machine_id", "machine", "type", "detail"), r,
                         strict=True)) for r in rows]

    def last_event_seq(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM events").fetchone()
        return int(row[0] or 0)
