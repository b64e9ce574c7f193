"""The daemon's core: every machine of the host, its lifecycle, and the event log.

Threads, not coroutines: the engine below (Machine, VMProcess, AgentClient)
blocks, and the API layer runs these calls on its thread pool. Each machine has
one re-entrant lock; every lifecycle action takes it, so two requests on the
same machine are serialised (a stop racing a delete, a start racing a start),
while machines never wait on each other. Long waits that are not lifecycle
actions (an exec's output, a main process's exit, QEMU's exit) happen outside
the lock on threads of their own.

A machine's QEMU is started in its own session and does not die with the
daemon: a restarted daemon re-adopts it from the state database, its pid file
and its sockets (:meth:`Manager.recover`).

Boot generations: each boot of a machine has a number; the watcher threads of
a boot (QEMU exit, main process exit) act only if their boot is still the
current one and not yet finalised, so a late watcher never clobbers a newer
state.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember import paths
from ember.api import models
from ember.daemon.db import StateDB
from ember.daemon.logs import CappedLog
from ember.errors import AgentError, EmberError, ImageError, ImageNotFound, MachineCrashed, VMMError
from ember.guest.bundle import GuestBundle, ensure_guest
from ember.host.probe import AccelChoice, choose_accel
from ember.images import ImageStore
from ember.images.oci import ProcessSpec, resolve_process
from ember.machine import Machine, MachineConfig
from ember.util import log
from ember.vmm import network
from ember.vmm.process import kill_strays
from ember.vmm.spec import MachineSpec

if TYPE_CHECKING:
    from ember.agent.client import Process
    from ember.agent.protocol import ExecRequest
    from ember.images.store import Image


# --- errors the API turns into 4xx ---------------------------------------------


class ManagerError(EmberError):
    status = 400
    code = "bad_request"


class NotFound(ManagerError):
    status = 404
    code = "not_found"


class Conflict(ManagerError):
    status = 409
    code = "conflict"


class Invalid(ManagerError):
    status = 422
    code = "invalid"


ACTIVE = ("starting", "running", "paused", "stopping")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- events --------------------------------------------------------------------


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


# --- one machine ---------------------------------------------------------------


class Managed:
    """One machine under the daemon: its record, its engine objects, its lock."""

    def __init__(self, mgr: Manager, doc: dict[str, Any]) -> None:
        self.mgr = mgr
        self.doc = doc
        self.lock = threading.RLock()
        self.machine: Machine | None = None
        self.main: Process | None = None
        self.boot = 0
        self.finalized = 0
        self.deleted = False
        self.restart_timer: threading.Timer | None = None
        self.fast_restarts = 0
        self.started_mono = 0.0
        self.root: Path = mgr.machines_root / str(doc["id"])
        self.output: CappedLog | None = None

    # --- record

    @property
    def id(self) -> str:
        return str(self.doc["id"])

    @property
    def name(self) -> str:
        return str(self.doc["name"])

    @property
    def state(self) -> str:
        return str(self.doc["state"])

    @property
    def state_dir(self) -> Path:
        return self.root / self.name

    @property
    def output_path(self) -> Path:
        return self.root / "output.log"

    @property
    def console_path(self) -> Path:
        return self.state_dir / MachineSpec.CONSOLE_LOG

    def public(self) -> dict[str, Any]:
        # dict.copy() runs in C under the GIL: a consistent snapshot even while a
        # lifecycle thread updates the record (readers never take the lock, which a
        # boot holds for a second).
        snapshot = self.doc.copy()
        return {k: v for k, v in snapshot.items() if not k.startswith("_")}

    def save(self) -> None:
        self.mgr.db.put_machine(self.doc)

    def _set(self, state: str, event: str | None = None, detail: str | None = None,
             **fields: Any) -> None:
        self.doc.update(fields)
        self.doc["state"] = state
        self.save()
        self.mgr.events.publish(self.id, self.name, event or state, detail)

    def _require(self, action: str, *states: str) -> None:
        if self.deleted:
            raise NotFound(f"machine {self.name} was deleted")
        if self.state not in states:
            raise Conflict(f"machine {self.name} is {self.state}: {action} needs it "
                           f"{' or '.join(states)}")

    # --- process resolution

    def _image(self) -> Image:
        try:
            return self.mgr.store.resolve(self.doc["image_id"])
        except ImageNotFound as exc:
            raise Conflict(f"image {self.doc['image']} of machine {self.name} "
                           "is no longer in the store") from exc

    def process(self, image: Image) -> ProcessSpec | None:
        """The main process from the image and the create request; None for an idle machine."""
        d = self.doc
        ep = d["entrypoint"] if d["entrypoint"] is not None else list(image.config.entrypoint or ())
        cmd = d["cmd"] if d["cmd"] is not None else (
            [] if d["entrypoint"] is not None else list(image.config.cmd or ()))
        env = [f"{k}={v}" for k, v in d["env"].items()]
        if not ep and not cmd:
            # no main process: still resolve env/cwd/user for execs
            spec = resolve_process(image.config, command=["true"], entrypoint=[], env=env,
                                   workdir=d["workdir"], user=d["user"])
            self.doc["_defaults"] = [list(spec.env), spec.cwd, spec.user]
            return None
        spec = resolve_process(image.config, command=cmd, entrypoint=ep, env=env,
                               workdir=d["workdir"], user=d["user"])
        self.doc["_defaults"] = [list(spec.env), spec.cwd, spec.user]
        return spec

    # --- lifecycle (callers hold no lock; these take it)

    def start(self) -> None:
        with self.lock:
            self._require("start", "created", "stopped", "crashed")
            self._cancel_restart()
            self.doc["_user_stopped"] = False
            self._boot()

    def _boot(self) -> None:
        """Boot the machine and start its main process. Lock held."""
        self._set("starting")
        m: Machine | None = None
        try:
            image = self._image()
            rootfs = self.mgr.store.rootfs(image)
            process = self.process(image)
            ports = self.mgr.assign_ports(self)
            config = self.mgr.machine_config(self.doc, ports)
            if self.state_dir.exists():
                shutil.rmtree(self.state_dir)
            self.root.mkdir(parents=True, exist_ok=True)
            m = Machine.create(machines_dir=self.root, guest=self.mgr.guest(), rootfs=rootfs,
                               accel=self.mgr.accel, config=config, name=self.name)
            self.machine = m
            m.start(boot_timeout=self.mgr.boot_timeout)
        except (EmberError, OSError) as exc:
            detail = str(exc)
            if isinstance(exc, MachineCrashed) and m is not None:
                taken = network.port_error(detail, m.spec.ports)
                if taken is not None:  # someone took the port between our check and QEMU's
                    exc = Conflict(f"machine {self.name}: {taken}")
                    detail = str(exc)
            elif isinstance(exc, network.PortUnavailable):
                exc = Conflict(f"machine {self.name}: {exc}")
                detail = str(exc)
            if m is not None:
                m.kill()
                m.close(remove_state=False)
                self._free_memory(m)
            self.machine = None
            state = "crashed" if isinstance(exc, MachineCrashed) else "stopped"
            self._set(state, detail=detail, reason=detail, pid=None, finished_at=now())
            if isinstance(exc, ManagerError):
                raise
            if isinstance(exc, MachineCrashed):
                raise
            raise Conflict(f"machine {self.name} cannot start: {exc}") from exc
        self.boot += 1
        gen = self.boot
        self.started_mono = time.monotonic()
        assert m.vm is not None
        self._set("running", event="started", pid=m.vm.pid, started_at=now(), finished_at=None,
                  exit_code=None, reason=None, ports=ports, accel=self.mgr.accel.name,
                  limits=self.mgr.limits_of(m), _main_channel=None)
        threading.Thread(target=self._watch_vm, args=(m, gen), daemon=True,
                         name=f"ember-watch-{self.name}").start()
        if process is not None:
            self._start_main(m, process, gen)

    def _start_main(self, m: Machine, process: ProcessSpec, gen: int) -> None:
        from ember.agent.client import ExecFailed
        from ember.agent.protocol import ExecRequest

        out = self._output()
        req = ExecRequest(argv=list(process.argv), env=list(process.env), cwd=process.cwd,
                          user=process.user, tty=False, stdin=False)
        proc = m.exec(req, on_stdout=out.write, on_stderr=out.write)
        try:
            proc.wait_started(timeout=30)
        except ExecFailed as exc:
            msg = f"main process could not start: {exc.message}"
            out.write(f"ember: {msg}\n".encode())
            self._power_off(gen, "stopped", msg, exit_code=exc.code)
            raise ManagerError(f"machine {self.name}: {msg}") from None
        except AgentError as exc:
            self._power_off(gen, "crashed", f"main process: {exc}")
            raise Conflict(f"machine {self.name}: main process: {exc}") from None
        self.main = proc
        self.doc["_main_channel"] = proc.channel
        self.doc["_main_request"] = [list(req.argv), list(req.env), req.cwd, req.user]
        self.save()
        threading.Thread(target=self._watch_main, args=(proc, gen), daemon=True,
                         name=f"ember-main-{self.name}").start()

    def _output(self) -> CappedLog:
        if self.output is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self.output = CappedLog(self.output_path)
        return self.output

    def _watch_main(self, proc: Process, gen: int) -> None:
        try:
            status = proc.wait()
        except AgentError:
            return  # the channel went away: the VM watcher decides what happened
        with self.lock:
            if gen != self.boot or self.finalized == gen:
                return
            self.mgr.events.publish(self.id, self.name, "exited",
                                    f"main process exited with code {status.exit_code}")
            self._power_off(gen, "stopped", f"main process exited with code {status.exit_code}",
                            exit_code=status.exit_code)
            self._maybe_restart(failed=status.exit_code != 0)

    def _watch_vm(self, m: Machine, gen: int) -> None:
        assert m.vm is not None
        with contextlib.suppress(Exception):
            m.vm.wait()
        with self.lock:
            if gen != self.boot or self.finalized == gen:
                return
            reason = str(m.vm.crashed())
            self._finalize(gen, "crashed", reason)
            self._maybe_restart(failed=True)

    def _power_off(self, gen: int, state: str, reason: str, exit_code: int | None = None,
                   grace: float = 0.0) -> None:
        """Stop the VM of boot ``gen`` (graceful, then harder) and finalise. Lock held."""
        m = self.machine
        if m is None or self.finalized == gen:
            return
        if self.main is not None and not self.main.done() and grace > 0:
            from ember.agent.client import ProcessTimeout

            with contextlib.suppress(AgentError):
                self.main.signal(signal.SIGTERM)
            try:
                exit_code = self.main.wait(grace).exit_code
            except (ProcessTimeout, AgentError):
                pass
        try:
            if m.state.value in ("running", "booting"):
                m.shutdown(timeout=5.0)
        except EmberError as exc:
            log.debug("shutdown of %s: %s", self.name, exc)
        self._finalize(gen, state, reason, exit_code=exit_code)

    def _finalize(self, gen: int, state: str, reason: str, exit_code: int | None = None) -> None:
        """Free the resources of boot ``gen`` and record how it ended. Lock held."""
        if self.finalized == gen:
            return
        self.finalized = gen
        m = self.machine
        if m is not None:
            m.kill()
            m.close(remove_state=False)
            self._free_memory(m)
        self.machine = None
        self.main = None
        fields: dict[str, Any] = {"pid": None, "finished_at": now(), "reason": reason,
                                  "_main_channel": None, "limits": {}}
        if exit_code is not None:
            fields["exit_code"] = exit_code
        self._set(state, detail=reason, **fields)

    @staticmethod
    def _free_memory(m: Machine) -> None:
        with contextlib.suppress(OSError):
            m.spec.path(MachineSpec.MEMORY_FILE).unlink()

    def stop(self, timeout: float) -> None:
        with self.lock:
            self._cancel_restart()
            self.doc["_user_stopped"] = True
            if self.state not in ACTIVE:
                self.save()
                return
            m = self.machine
            assert m is not None
            self._set("stopping")
            if self.doc.get("_paused"):
                self._qmp("cont")
                self.doc["_paused"] = False
            self._power_off(self.boot, "stopped", "stopped by request", grace=timeout)

    def kill(self) -> None:
        with self.lock:
            self._cancel_restart()
            self.doc["_user_stopped"] = True
            self._require("kill", "running", "paused")
            self.doc["_paused"] = False
            self._finalize(self.boot, "stopped", "killed by request")

    def pause(self) -> None:
        with self.lock:
            self._require("pause", "running")
            self._qmp("stop")
            self._set("paused", _paused=True)

    def resume(self) -> None:
        with self.lock:
            self._require("resume", "paused")
            self._qmp("cont")
            self._set("running", event="resumed", _paused=False)
            m = self.machine
            if m is not None and m.agent is None:  # adopted while paused
                self._reconnect(m, self.boot)

    def _qmp(self, command: str) -> None:
        m = self.machine
        assert m is not None and m.vm is not None
        try:
            with m.vm.qmp() as q:
                q.execute(command)
        except Exception as exc:
            raise Conflict(f"machine {self.name}: QEMU refused {command}: {exc}") from exc

    def remove(self, force: bool) -> None:
        with self.lock:
            if self.deleted:
                raise NotFound(f"no machine named {self.name}")
            if self.state in ACTIVE:
                if not force:
                    raise Conflict(f"machine {self.name} is {self.state}: stop it first, "
                                   "or delete with force")
                self._finalize(self.boot, "stopped", "deleted")
            self._cancel_restart()
            self.deleted = True
            if self.output is not None:
                self.output.close()
            shutil.rmtree(self.root, ignore_errors=True)
            self.mgr.db.delete_machine(self.id)
            self.mgr.forget(self)
            self.mgr.events.publish(self.id, self.name, "deleted")

    # --- restart policy

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

    def _cancel_restart(self) -> None:
        if self.restart_timer is not None:
            self.restart_timer.cancel()
            self.restart_timer = None

    # --- exec

    def exec(self, body: models.ExecCreate, *, on_stdout: Callable[[bytes], None] | None = None,
             on_stderr: Callable[[bytes], None] | None = None,
             stdin: bool | None = None) -> Process:
        """Start ``body`` in the running machine; env, cwd and user default to the main's."""
        from ember.agent.protocol import ExecRequest
        from ember.images.oci import merge_env

        with self.lock:
            self._require("exec", "running")
            m = self.machine
            assert m is not None
            base_env, cwd, user = self.doc.get("_defaults") or [[], "/", ""]
            try:
                env = merge_env(base_env, [f"{k}={v}" for k, v in body.env.items()])
            except ImageError as exc:
                raise Invalid(str(exc)) from None
            req: ExecRequest = ExecRequest(
                argv=list(body.cmd), env=list(env), cwd=body.workdir or cwd,
                user=body.user if body.user is not None else user, tty=body.tty,
                stdin=stdin if stdin is not None else body.stdin is not None)
            try:
                return m.exec(req, on_stdout=on_stdout, on_stderr=on_stderr)
            except AgentError as exc:
                raise Conflict(f"machine {self.name}: {exc}") from exc

    def check_running(self, action: str) -> None:
        """Raise the 409 (404 once deleted) unless running; no lock: a hint, not a promise."""
        self._require(action, "running")

    def running_machine(self, action: str) -> Machine:
        with self.lock:
            self._require(action, "running")
            assert self.machine is not None
            return self.machine

    # --- re-adoption

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
                          finished_at=now(), _main_channel=None, limits={})
                self._maybe_restart(failed=True)
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
                      _main_channel=None, limits={})
            self._maybe_restart(failed=True)
        else:
            self._set("stopped", detail="stopped by request", reason="stopped by request",
                      pid=None, finished_at=now(), _main_channel=None, limits={})

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
                return
            req = ExecRequest(argv=saved[0], env=saved[1], cwd=saved[2], user=saved[3])
            out = self._output()
            proc = m.agent.attach(int(channel), req, on_stdout=out.write, on_stderr=out.write)
            self.main = proc
            threading.Thread(target=self._watch_main, args=(proc, gen), daemon=True,
                             name=f"ember-main-{self.name}").start()


# --- the manager ---------------------------------------------------------------


class Manager:
    """All machines and images of one Ember home."""

    def __init__(self, home: Path | None = None, *, accel: str | None = None,
                 boot_timeout: float = 60.0) -> None:
        self.home = home or paths.data_dir()
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = StateDB(self.home / "state.db")
        self.events = EventBus(self.db)
        self.store = ImageStore(paths.images_dir())
        self.machines_root = paths.machines_dir() / "daemon"
        self.machines_root.mkdir(parents=True, exist_ok=True)
        self.accel: AccelChoice = choose_accel(accel)
        self.boot_timeout = boot_timeout
        self._lock = threading.Lock()
        self._images_lock = threading.Lock()
        self._machines: dict[str, Managed] = {}
        self._guest: GuestBundle | None = None
        self._guest_lock = threading.Lock()

    # --- guest and hardware

    def guest(self) -> GuestBundle:
        with self._guest_lock:
            if self._guest is None:
                self._guest = ensure_guest(paths.cache_dir(), lambda msg: log.info("%s", msg))
            return self._guest

    def machine_config(self, doc: dict[str, Any], ports: list[dict[str, Any]]) -> MachineConfig:
        kwargs: dict[str, Any] = {"cpus": doc["cpus"], "memory_mib": doc["memory_mib"],
                                  "hostname": doc["hostname"]}
        kwargs["network"] = doc["network"]
        kwargs["ports"] = tuple(network.PortMapping(host_port=p["host_port"],
                                                    guest_port=p["guest_port"],
                                                    host_ip=p["host_ip"]) for p in ports)
        kwargs["limit_resources"] = True
        return MachineConfig(**kwargs)

    def limits_of(self, m: Machine) -> dict[str, str]:
        cg = m.vm.cgroup if m.vm is not None else None
        if cg is None:
            return {}
        try:
            info = cg.limits()
        except EmberError as exc:
            log.debug("limits of %s: %s", m.name, exc)
            return {}
        keep = ("version", "cpus", "memory_max_bytes")
        out = {k: str(info[k]) for k in keep if k in info}
        out["cgroup"] = str(cg.path)
        return out

    def assign_ports(self, mm: Managed) -> list[dict[str, Any]]:
        """Concrete host ports for a boot: requested ones checked, 0 replaced by a free one."""
        out: list[dict[str, Any]] = []
        taken = set()
        with self._lock:
            for other in self._machines.values():
                if other is not mm and other.state in ACTIVE:
                    for p in other.doc.get("ports") or []:
                        taken.add((p["host_ip"], p["host_port"]))
        for p in mm.doc["_port_specs"]:
            port = dict(p)
            if port["host_port"] == 0:
                try:
                    port["host_port"] = network.free_port(port["host_ip"])
                except EmberError as exc:
                    raise Invalid(str(exc)) from None
            elif (port["host_ip"], port["host_port"]) in taken:
                raise Conflict(f"host port {port['host_ip']}:{port['host_port']} is published "
                               "by another machine")
            out.append(port)
        network.check_ports_free(tuple(
            network.PortMapping(host_port=p["host_port"], guest_port=p["guest_port"],
                                host_ip=p["host_ip"]) for p in out))
        return out

    # --- lookup

    def get(self, ref: str) -> Managed:
        with self._lock:
            for mm in self._machines.values():
                if mm.name == ref or mm.id == ref:
                    return mm
            hits = [mm for mm in self._machines.values() if mm.id.startswith(ref)] \
                if len(ref) >= 4 else []
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise Conflict(f"machine id prefix {ref!r} is ambiguous")
        raise NotFound(f"no machine named {ref!r}")

    def all(self) -> list[Managed]:
        with self._lock:
            return list(self._machines.values())

    def forget(self, mm: Managed) -> None:
        with self._lock:
            self._machines.pop(mm.id, None)

    # --- machines

    def create(self, body: models.MachineCreate) -> Managed:
        try:
            image = self.store.resolve(body.image)
        except ImageNotFound as exc:
            raise NotFound(str(exc)) from None
        except ImageError as exc:
            raise Invalid(str(exc)) from None
        ncpu = os.cpu_count() or 1
        if body.cpus > ncpu:
            raise Invalid(f"cpus: {body.cpus} is more than the host's {ncpu} CPUs")
        host_mib = _host_memory_mib()
        if host_mib and body.memory_mib > host_mib:
            raise Invalid(f"memory_mib: {body.memory_mib} is more than the host's "
                          f"{host_mib} MiB")
        if body.network == models.NetworkMode.none and body.ports:
            raise Invalid("ports cannot be published with network none")
        seen = set()
        for p in body.ports:
            if p.host_port and (p.host_ip, p.host_port) in seen:
                raise Invalid(f"host port {p.host_port} is published twice")
            seen.add((p.host_ip, p.host_port))
        mid = secrets.token_hex(6)
        name = body.name or f"ember-{mid[:6]}"
        doc: dict[str, Any] = {
            "id": mid, "name": name, "image": body.image, "image_id": image.id,
            "state": "created", "cpus": body.cpus, "memory_mib": body.memory_mib,
            "env": dict(body.env), "cmd": body.cmd, "entrypoint": body.entrypoint,
            "workdir": body.workdir, "user": body.user, "hostname": body.hostname or name,
            "network": body.network.value,
            "ports": [p.model_dump() for p in body.ports],
            "restart": body.restart.value, "restart_count": 0, "created_at": now(),
            "started_at": None, "finished_at": None, "exit_code": None, "reason": None,
            "pid": None, "accel": None, "limits": {},
            "_port_specs": [p.model_dump() for p in body.ports], "_user_stopped": False,
        }
        mm = Managed(self, doc)
        with self._lock:
            if any(x.name == name for x in self._machines.values()):
                raise Conflict(f"a machine named {name} exists already")
            self._machines[mid] = mm
        try:
            mm.root.mkdir(parents=True, exist_ok=False)
            mm.save()
        except BaseException:
            self.forget(mm)
            shutil.rmtree(mm.root, ignore_errors=True)
            raise
        self.events.publish(mid, name, "created")
        return mm

    # --- images

    def images(self) -> list[Image]:
        return self.store.list()

    def image(self, ref: str) -> Image:
        try:
            return self.store.resolve(ref)
        except ImageNotFound as exc:
            raise NotFound(str(exc)) from None
        except ImageError as exc:
            raise Invalid(str(exc)) from None

    def import_image(self, path: Path, tag: str | None) -> Image:
        if not path.is_absolute():
            raise Invalid(f"path {str(path)!r} must be absolute: the daemon reads it, "
                          "from its own working directory")
        try:
            exists = path.exists()
        except OSError as exc:  # e.g. a name longer than 255 bytes
            raise Invalid(f"{str(path)!r}: {exc.strerror or exc}") from None
        if not exists:
            raise Invalid(f"{str(path)!r} does not exist on the daemon's host")
        with self._images_lock:
            try:
                image = self.store.import_path(path, tag=tag)
                self.store.rootfs(image)
            except ImageError as exc:
                raise Invalid(str(exc)) from None
        return image

    def remove_image(self, ref: str) -> Image:
        image = self.image(ref)
        users = [mm.name for mm in self.all() if mm.doc["image_id"] == image.id]
        if users:
            raise Conflict(f"image {ref} is used by machine {users[0]}: delete it first")
        with self._images_lock:
            try:
                return self.store.remove(ref)
            except ImageError as exc:
                raise Conflict(str(exc)) from None

    # --- daemon start-up

    def recover(self) -> None:
        """Load every machine of the database; re-adopt those whose QEMU still runs."""
        for doc in self.db.machines():
            mm = Managed(self, doc)
            with self._lock:
                self._machines[mm.id] = mm
        known = {mm.id for mm in self.all()}
        for entry in os.scandir(self.machines_root):
            # a create cut short before its record was written
            if entry.name not in known and entry.is_dir(follow_symlinks=False):
                log.info("removing %s: no machine record", entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)
        for mm in self.all():
            if mm.state in ACTIVE:
                try:
                    mm.adopt()
                except Exception:
                    log.exception("re-adopting %s failed", mm.name)
            elif mm.state == "crashed" and mm.doc["restart"] == "always" \
                    and not mm.doc.get("_user_stopped"):
                with mm.lock:
                    mm._maybe_restart(failed=True)

    def close(self) -> None:
        """Release the daemon's side of every machine; the machines keep running."""
        for mm in self.all():
            with mm.lock:
                mm._cancel_restart()
                m = mm.machine
                if m is not None:
                    if m.agent is not None:
                        m.agent.close()
                    if m.vm is not None:
                        m.vm.release()
                if mm.output is not None:
                    mm.output.close()
        self.db.close()


def _host_memory_mib() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return 0

