"""Helpers for tests that drive the daemon over raw HTTP: machines and its event stream.

``Events`` follows ``GET /v1/events`` from the sequence number the daemon had
when it was made (``since``: replayed, then followed, without a gap), so a
test waits for what the daemon did instead of sleeping.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from conftest import Daemon

Event = dict[str, Any]


def create(api: httpx.Client, **body: Any) -> dict[str, Any]:
    if "snapshot" not in body:
        body.setdefault("image", "sample:latest")
    r = api.post("/v1/machines", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def start(api: httpx.Client, name: str) -> dict[str, Any]:
    r = api.post(f"/v1/machines/{name}/start")
    assert r.status_code == 200, r.text
    return dict(r.json())


def run(api: httpx.Client, name: str, *cmd: str, **extra: Any) -> dict[str, Any]:
    r = api.post(f"/v1/machines/{name}/exec", json={"cmd": list(cmd), **extra})
    assert r.status_code == 200, r.text
    return dict(r.json())


def get(api: httpx.Client, name: str) -> dict[str, Any]:
    r = api.get(f"/v1/machines/{name}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def delete(api: httpx.Client, name: str) -> None:
    r = api.delete(f"/v1/machines/{name}", params={"force": "true"})
    assert r.status_code in (204, 404), r.text


def wait_for(what: str, cond: Callable[[], Any], timeout: float = 60) -> Any:
    """Poll ``cond`` until it returns something true (bounded); return that."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def last_seq(api: httpx.Client) -> int:
    lines = api.get("/v1/events", params={"since": 0, "follow": "false"}).text.splitlines()
    return int(json.loads(lines[-1])["seq"]) if lines else 0


def stamp(ev: Event) -> float:
    """An event's time (the daemon's clock, millisecond resolution) as a POSIX timestamp."""
    return datetime.fromisoformat(str(ev["time"]).replace("Z", "+00:00")).timestamp()


def delay_of(ev: Event) -> float:
    """The delay a ``restarting`` event announces: its detail reads ``in 0.4 s``."""
    assert ev["type"] == "restarting", ev
    words = str(ev["detail"]).split()
    assert len(words) == 3 and words[0] == "in" and words[2] == "s", ev
    return float(words[1])


class Events:
    """The daemon's events from now on (or after seq ``since``), optionally of one machine.

    Followed on a thread of its own until ``close``.
    """

    def __init__(self, daemon: Daemon, machine: str | None = None,
                 since: int | None = None) -> None:
        self.machine = machine
        self.events: list[Event] = []
        self.error: str | None = None  # why following stopped early
        self._cond = threading.Condition()
        if since is None:
            with daemon.http() as c:
                since = last_seq(c)
        self.since = since
        # A plain socket, so that close() can wake the reader with shutdown().
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(daemon.socket))
        self._sock.sendall(f"GET /v1/events?since={since} HTTP/1.1\r\n"
                           "Host: ember\r\nConnection: close\r\n\r\n".encode())
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        with contextlib.suppress(OSError), self._sock.makefile("rb") as f:
            status = f.readline()
            if status.split()[1:2] != [b"200"]:
                self.error = f"GET /v1/events answered {status!r}"
                return
            headers = b""
            while (h := f.readline()) not in (b"\r\n", b""):
                headers += h.lower()
            chunked = b"transfer-encoding: chunked" in headers
            buf = b""
            while True:
                if chunked:
                    size = int(f.readline().split(b";")[0] or b"0", 16)
                    data = f.read(size)
                    f.readline()  # the CRLF after the chunk
                else:
                    data = f.read1(1 << 16)
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        self.error = f"not an event: {line!r}"
                        return
                    if self.machine is None or ev["machine"] == self.machine:
                        with self._cond:
                            self.events.append(ev)
                            self._cond.notify_all()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self._sock.close()

    def __enter__(self) -> Events:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def types(self) -> list[str]:
        with self._cond:
            return [e["type"] for e in self.events]

    def of(self, type: str, machine: str | None = None) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e["type"] == type
                    and (machine is None or e["machine"] == machine)]

    def wait_for_machine(self, machine: str, type: str, n: int = 1,
                         timeout: float = 120) -> list[Event]:
        """Wait until ``n`` events of ``type`` came for ``machine``; that machine's events."""
        self.wait(lambda evs: sum(e["type"] == type and e["machine"] == machine
                                  for e in evs) >= n, f"{n} {type} events of {machine}",
                  timeout)
        with self._cond:
            return [e for e in self.events if e["machine"] == machine]

    def wait(self, pred: Callable[[list[Event]], bool], what: str,
             timeout: float = 120) -> list[Event]:
        """Wait until ``pred(events so far)`` holds; the events so far."""
        with self._cond:
            ok = self._cond.wait_for(lambda: pred(self.events), timeout)
            assert ok, f"timed out waiting for {what} ({self.error}); events: {self._brief()}"
            return list(self.events)

    def wait_count(self, type: str, n: int, timeout: float = 120) -> list[Event]:
        """Wait until ``n`` events of ``type`` came; those events."""
        self.wait(lambda evs: sum(e["type"] == type for e in evs) >= n,
                  f"{n} {type} events", timeout)
        return self.of(type)

    def none_within(self, type: str, seconds: float, machine: str | None = None) -> None:
        """Assert that no new ``type`` event (of ``machine``) comes within ``seconds``.

        Waits that long: the way to see that something does not happen.
        """
        n = len(self.of(type, machine))
        with self._cond:
            came = self._cond.wait_for(lambda: len([
                e for e in self.events if e["type"] == type
                and (machine is None or e["machine"] == machine)]) > n, seconds)
        assert not came, f"a {type} event came: {self._brief()}"

    def _brief(self) -> list[tuple[str, str, str | None]]:
        """The last events (machine, type, detail), for a failure's message."""
        return [(e["machine"], e["type"], e.get("detail")) for e in self.events[-30:]]


@contextlib.contextmanager
def machine(api: httpx.Client, **body: Any) -> Iterator[dict[str, Any]]:
    """A machine created for one test and deleted (forced) after it."""
    m = create(api, **body)
    try:
        yield m
    finally:
        delete(api, m["name"])
