"""The egress policies of the daemon's machines, and the watcher of their denied connections.

A policy (``vmm/egress.py``) is given at create or by ``PATCH /v1/machines/{name}``
and kept in the machine's record (``egress``, normalised), so every later start
boots with it (``Manager.machine_config``); a PATCH of a running (or paused)
machine also replaces the policy of its firewall at once, under the machine's
lock, before the record changes: a policy that cannot be applied is not kept.

Policies need the tap network (a root daemon's ``user`` network). A request
for one where it cannot hold is refused when it is made: 422 for a create that
also asks for network none, 409 where the machine (network none, a running
one on slirp) or the daemon (its machines get slirp: not root, no ``nft``...)
cannot enforce it; clearing a policy is always allowed.

:class:`EgressWatch`, one daemon thread, reads every :data:`POLL_INTERVAL`
seconds the drop counter of each running machine's firewall
(``Machine.egress_denied``, which runs a process), keeps it for the records
and ``/metrics`` (:attr:`Managed.egress_count`), and publishes an
``egress-denied`` event when it grew. What it reported last is kept in the
record (``_egress_seen``, per boot), so a daemon restart reports no drop twice.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from ember.daemon.errors import Conflict, Invalid, NotFound
from ember.errors import EmberError
from ember.util import log
from ember.vmm import network
from ember.vmm.egress import EgressPolicy

if TYPE_CHECKING:
    from ember.api import models
    from ember.daemon.managed import Managed
    from ember.daemon.manager import Manager
    from ember.machine import Machine

#: Seconds between two readings of the running machines' drop counters.
POLL_INTERVAL = 5.0
#: Seconds the watcher waits for a machine's lock (held by a boot, a stop...) before it
#: leaves that machine to the next round (the counter is cumulative: nothing is lost).
LOCK_WAIT = 2.0
#: The states in which a machine has a firewall whose counter means something.
LIVE = ("running", "paused")


def policy_of(body: models.Egress | None) -> EgressPolicy | None:
    """The policy of a request's ``egress``; None for none (or one without rules).

    Raises:
        Invalid: a malformed rule (422), the message naming it.
    """
    if body is None:
        return None
    try:
        return EgressPolicy.from_json(body.model_dump())
    except EmberError as exc:
        raise Invalid(str(exc)) from None


def as_record(policy: EgressPolicy | None) -> dict[str, list[str]] | None:
    return policy.to_json() if policy is not None else None


def backend() -> tuple[str, str]:
    """(backend, why) of the ``user`` network this daemon's machines get, as
    ``network.default_backend`` chooses it."""
    from ember.host import jail
    from ember.vmm import netns

    return network.backend_choice(os.environ.get("EMBER_NET_BACKEND", ""),
                                  jail.policy().mode == jail.MODE_FULL, netns.unavailable())


def check_daemon_enforces() -> None:
    """Raises Conflict (409) unless this daemon's machines get the tap network."""
    kind, why = backend()
    if kind != network.BACKEND_TAP:
        raise Conflict(f"egress policies need the tap network (root's default): this "
                       f"daemon's machines get {why}")


def check_create(name: str, net: str, policy: EgressPolicy | None) -> None:
    """A create's policy: 422 with network none, 409 where the daemon cannot enforce it."""
    if policy is None:
        return
    if net != network.NETWORK_USER:
        raise Invalid(f"egress policies need the tap network: machine {name} would have "
                      f"network {net}, which reaches nothing")
    check_daemon_enforces()


def describe(policy: EgressPolicy | None) -> str:
    if policy is None:
        return "egress policy cleared: public addresses only"
    parts = []
    if policy.allow:
        parts.append(f"{_rules(len(policy.allow))} allowed, nothing else")
    if policy.deny:
        parts.append(f"{_rules(len(policy.deny))} denied")
    return "egress policy: " + "; ".join(parts)


def _rules(n: int) -> str:
    return f"{n} rule" if n == 1 else f"{n} rules"


def set_policy(mm: Managed, body: models.Egress | None) -> None:
    """Give ``mm`` the policy ``body`` (None: none): kept in its record for the next
    starts, and applied at once if it is running or paused.

    Raises:
        Invalid: a malformed rule. NotFound: the machine was deleted.
        Conflict: the machine or the daemon cannot enforce a policy (network none,
            slirp), or its firewall refused the new one (then nothing changed).
    """
    policy = policy_of(body)
    with mm.lock:
        if mm.deleted:
            raise NotFound(f"no machine named {mm.name}")
        m = mm.machine if mm.state in LIVE else None
        if policy is not None and mm.doc["network"] != network.NETWORK_USER:
            raise Conflict(f"egress policies need the tap network: machine {mm.name} has "
                           f"network {mm.doc['network']}")
        if m is not None:
            if policy is not None or mm.doc.get("egress") is not None:
                try:
                    m.set_egress(policy)
                except EmberError as exc:
                    raise Conflict(f"machine {mm.name}: {exc}") from None
        elif policy is not None:
            check_daemon_enforces()
        mm.doc["egress"] = as_record(policy)
        mm.save()
        when = "applied now" if m is not None else "from its next start"
        mm.mgr.events.publish(mm.id, mm.name, "egress-updated",
                              f"{describe(policy)} ({when})")


def refresh(mm: Managed) -> None:
    """Read ``mm``'s drop counter now (for a record that is asked for by itself)."""
    m = mm.machine
    if m is not None and mm.state in LIVE:
        _read(mm, m)


def _read(mm: Managed, m: Machine) -> int | None:
    """``m``'s drop counter, kept as ``mm.egress_count``; None when it has none (not on
    the tap network) or it cannot be read now."""
    started = mm.doc.get("started_at")
    try:
        total = m.egress_denied()
    except (EmberError, OSError) as exc:  # the machine went meanwhile
        log.debug("egress counter of %s: %s", mm.name, exc)
        return None
    if total is not None:
        mm.egress_count = (started, total)
    return total


def denied_message(new: int, total: int) -> str:
    what = "connection" if new == 1 else "connections"
    return f"{new} {what} denied ({total} in all)"


class EgressWatch:
    """The daemon thread that polls the machines' drop counters (see the module)."""

    def __init__(self, mgr: Manager, interval: float = POLL_INTERVAL) -> None:
        self.mgr = mgr
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="ember-egress-watch")
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread (at most one machine's reading later) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # a bug must not end the watching
                log.exception("egress watch failed")

    def poll(self) -> None:
        """One round: every running or paused machine's counter, and its events."""
        for mm in self.mgr.all():
            if self._stop.is_set():
                return
            self.poll_machine(mm)

    def poll_machine(self, mm: Managed) -> None:
        m = mm.machine
        if m is None or mm.deleted or mm.state not in LIVE:
            return
        started = mm.doc.get("started_at")
        total = _read(mm, m)
        if total is None:
            return
        if not mm.lock.acquire(timeout=LOCK_WAIT):
            return  # a lifecycle action holds it: the next round reports
        try:
            if mm.machine is not m or mm.deleted or mm.doc.get("started_at") != started:
                return  # stopped or booted again meanwhile
            seen_at, seen = mm.doc.get("_egress_seen") or (None, 0)
            if seen_at != started or total < seen:
                seen = 0  # a new boot (or a firewall made anew): a counter from 0
            if total == seen and seen_at == started:
                return
            mm.doc["_egress_seen"] = [started, total]
            mm.save()
            if total > seen:
                mm.mgr.events.publish(mm.id, mm.name, "egress-denied",
                                      denied_message(total - seen, total))
        finally:
            mm.lock.release()
