"""The restart policy of a daemon machine: ``no``, ``on-failure`` or ``always``, with backoff.

A mixin of :class:`~ember.daemon.managed.Managed`: when a boot ends (its main
process exits, its QEMU dies, or it was cut short while the daemon was down),
the machine is booted again after 0.1 s, doubling for every restart that comes
within 10 s of the previous start, up to 10 s. A stop, kill, start or delete
by the user cancels a pending restart.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from ember.daemon.states import ACTIVE
from ember.errors import EmberError
from ember.util import log

if TYPE_CHECKING:
    from ember.daemon.manager import Manager


class RestartPolicy:
    """Restarts a machine after its boot ended, as its ``restart`` field asks."""

    if TYPE_CHECKING:  # provided by Managed
        mgr: Manager
        doc: dict[str, Any]
        lock: threading.RLock
        deleted: bool
        restart_timer: threading.Timer | None
        fast_restarts: int
        started_mono: float

        @property
        def id(self) -> str: ...
        @property
        def name(self) -> str: ...
        @property
        def state(self) -> str: ...
        def save(self) -> None: ...
        def _boot(self) -> None: ...

    def _maybe_restart(self, failed: bool) -> None:
        policy = self.doc["restart"]
        if self.deleted or self.doc.get("_user_stopped"):
            return
        if policy == "always" or (policy == "on-failure" and failed):
            if time.monotonic() - self.started_mono > 10:
                self.fast_restarts = 0
            delay = min(0.1 * 2 ** self.fast_restarts, 10.0)
            self.fast_restarts += 1
            self.doc["restart_count"] = int(self.doc.get("restart_count", 0)) + 1
            self.save()
            self.mgr.events.publish(self.id, self.name, "restarting", f"in {delay:.1f} s")
            self.restart_timer = threading.Timer(delay, self._restart)
            self.restart_timer.daemon = True
            self.restart_timer.start()

    def _restart(self) -> None:
        with self.lock:
            self.restart_timer = None
            if self.deleted or self.doc.get("_user_stopped") or self.state in ACTIVE:
                return
            try:
                self._boot()
            except EmberError as exc:
                log.warning("restart of %s failed: %s", self.name, exc)
                self._maybe_restart(failed=True)

    def _cancel_restart(self) -> bool:
        """Cancel a pending restart; whether there was one."""
        if self.restart_timer is None:
            return False
        self.restart_timer.cancel()
        self.restart_timer = None
        return True
