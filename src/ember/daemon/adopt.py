"""Re-adoption: a restarted daemon takes over the machines the last one left running.

A machine's QEMU is started in its own session and does not die with the
daemon: a restarted daemon re-adopts it from the state database, its pid file
and its sockets (:meth:`Manager.recover <ember.daemon.manager.Manager.recover>`
calls :meth:`Adoption.adopt` for every machine whose record is active).

A mixin of :class:`~ember.daemon.managed.Managed`; an adopted machine gets a
new boot generation and watcher threads like a booted one.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from ember.daemon.events import now
from ember.errors import MachineCrashed, VMMError
from ember.machine import Machine
from ember.util import log
from ember.vmm.process import kill_strays

if TYPE_CHECKING:
    from pathlib import Path

    from ember.agent.client import Process
    from ember.daemon.logs import CappedLog


class Adoption:
    """Takes a machine over from an earlier daemon (or finishes it off)."""

    if TYPE_CHECKING:  # provided by Managed
        doc: dict[str, Any]
        lock: threading.RLock
        machine: Machine | None
        main: Process | None
        boot: int
        started_mono: float

        @property
        def name(self) -> str: ...
        @property
        def state(self) -> str: ...
        @property
        def state_dir(self) -> Path: ...
        def save(self) -> None: ...
        def _set(self, state: str, event: str | None = None, detail: str | None = None,
                 **fields: Any) -> None: ...
        def _output(self) -> CappedLog: ...
        def _watch_vm(self, m: Machine, gen: int) -> None: ...
        def _watch_main(self, proc: Process, gen: int) -> None: ...
        def _power_off(self, gen: int, state: str, reason: str, exit_code: int | None = None,
                       grace: float = 0.0) -> None: ...
        def _finalize(self, gen: int, state: str, reason: str,
                      exit_code: int | None = None) -> None: ...
        @staticmethod
        def _free_memory(m: Machine) -> None: ...
        def _maybe_restart(self, failed: bool) -> None: ...
        def _ended(self) -> None: ...

    def adopt(self) -> None:
        """Take the machine over from an earlier daemon, or record that it died meanwhile."""
        with self.lock:
            paused = bool(self.doc.get("_paused"))
            if self.state in ("starting", "stopping"):
                self._abandon()
                return
            try:
                m = Machine.adopt(self.state_dir, connect_agent=False)
            except (VMMError, OSError) as exc:
                log.info("machine %s: %s", self.name, exc)
                if self.state_dir.exists():
                    kill_strays(self.state_dir)
                self._set("crashed", detail="QEMU exited while the daemon was down",
                          reason="QEMU exited while the daemon was down", pid=None,
                          finished_at=now(), _main_channel=None, limits={}, ports=[])
                self._maybe_restart(failed=True)
                self._ended()
                return
            self.machine = m
            self.boot += 1
            gen = self.boot
            self.started_mono = time.monotonic()
            threading.Thread(target=self._watch_vm, args=(m, gen), daemon=True,
                             name=f"ember-watch-{self.name}").start()
            if paused:
                self.doc["state"] = "paused"
                self.save()
                return
            self._reconnect(m, gen)

    def _abandon(self) -> None:
        """A machine the last daemon left half started or half stopped: finish it off.

        Its main process may never have been started (or its stop was under
        way), so it is not re-adopted: its QEMU is killed, and a start that was
        cut short counts as a crash (the restart policy applies).
        """
        was = self.state
        try:
            m = Machine.adopt(self.state_dir, connect_agent=False)
        except (VMMError, OSError):
            m = None
        if m is not None:
            m.kill()
            m.close(remove_state=False)
            self._free_memory(m)
        elif self.state_dir.exists():
            kill_strays(self.state_dir)  # spawned, but its pid never recorded
        if was == "starting":
            reason = "the daemon stopped while the machine was starting"
            self._set("crashed", detail=reason, reason=reason, pid=None, finished_at=now(),
                      _main_channel=None, limits={}, ports=[])
            self._maybe_restart(failed=True)
        else:
            self._set("stopped", detail="stopped by request", reason="stopped by request",
                      pid=None, finished_at=now(), _main_channel=None, limits={}, ports=[])
        self._ended()

    def _reconnect(self, m: Machine, gen: int) -> None:
        try:
            ready = m.reconnect(hello_timeout=10.0)
        except MachineCrashed as exc:
            self._finalize(gen, "crashed", str(exc))
            return
        state = self.state if self.state in ("running", "paused") else "running"
        self.doc["state"] = state
        self.save()
        channel = self.doc.get("_main_channel")
        saved = self.doc.get("_main_request")
        if channel and saved and m.agent is not None:
            from ember.agent.protocol import ExecRequest

            live = ready.extra.get("channels")
            if isinstance(live, list) and channel not in live:
                self._power_off(gen, "stopped", "main process exited while the daemon was down")
                self._maybe_restart(failed=True)
                self._ended()
                return
            req = ExecRequest(argv=saved[0], env=saved[1], cwd=saved[2], user=saved[3])
            out = self._output()
            proc = m.agent.attach(int(channel), req, on_stdout=out.write, on_stderr=out.write)
            self.main = proc
            threading.Thread(target=self._watch_main, args=(proc, gen), daemon=True,
                             name=f"ember-main-{self.name}").start()
