"""One machine under the daemon: its record, its lifecycle and its watcher threads.

Threads, not coroutines: the engine below (Machine, VMProcess, AgentClient)
blocks, and the API layer runs these calls on its thread pool. Each machine has
one re-entrant lock; every lifecycle action takes it, so two requests on the
same machine are serialised (a stop racing a delete, a start racing a start),
while machines never wait on each other. Long waits that are not lifecycle
actions (an exec's output, a main process's exit, QEMU's exit) happen outside
the lock on threads of their own.

Boot generations: each boot of a machine has a number; the watcher threads of
a boot (QEMU exit, main process exit) act only if their boot is still the
current one and not yet finalised, so a late watcher never clobbers a newer
state.

The restart policy (:mod:`ember.daemon.restart`) and the re-adoption of a
machine after a daemon restart (:mod:`ember.daemon.adopt`) are mixins of
:class:`Managed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.api import models
from ember.daemon.adopt import Adoption
from ember.daemon.errors import Conflict, Invalid, ManagerError, NotFound
from ember.daemon.events import now
from ember.daemon.logs import CappedLog
from ember.daemon.restart import RestartPolicy
from ember.daemon.states import ACTIVE
from ember.errors import AgentError, EmberError, ImageError, ImageNotFound, MachineCrashed
from ember.images.oci import ProcessSpec, resolve_process
from ember.machine import Machine
from ember.util import log
from ember.vmm import network
from ember.vmm.spec import MachineSpec

if TYPE_CHECKING:
    from ember.agent.client import Process
    from ember.agent.protocol import ExecRequest
    from ember.daemon.manager import Manager
    from ember.images.oci import ImageConfig
    from ember.images.store import Image
    from ember.machine import MachineConfig
    from ember.snapshots.compat import HostIdentity
    from ember.snapshots.store import Snapshot, SnapshotStore


class Managed(Adoption, RestartPolicy):
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
        #: The last reading of its firewall's drop counter: (``started_at`` of the boot
        #: it was read in, total), by the egress watcher or a GET (``daemon/egress.py``).
        self.egress_count: tuple[str | None, int] | None = None

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
        # Named at boot: a machine renamed while it runs keeps its QEMU's directory.
        return self.root / str(self.doc.get("_vm_name") or self.name)

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

    def egress_denied(self) -> int | None:
        """New connections its firewall dropped in this boot, as last read (no reading
        here: this is for every record); None while not running or not read yet."""
        count = self.egress_count
        if count is None or self.state not in ("running", "paused") \
                or count[0] != self.doc.get("started_at"):
            return None
        return count[1]

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

    def image(self) -> Image:
        try:
            return self.mgr.store.resolve(self.doc["image_id"])
        except ImageNotFound as exc:
            raise Conflict(f"image {self.doc['image']} of machine {self.name} "
                           "is no longer in the store") from exc

    def process(self, config: ImageConfig, *, idle: bool = False) -> ProcessSpec | None:
        """The main process from the image config and the create request; None for an idle
        machine (or, with ``idle``, one whose main process is a clone's inherited one)."""
        d = self.doc
        ep = d["entrypoint"] if d["entrypoint"] is not None else list(config.entrypoint or ())
        cmd = d["cmd"] if d["cmd"] is not None else (
            [] if d["entrypoint"] is not None else list(config.cmd or ()))
        env = [f"{k}={v}" for k, v in d["env"].items()]
        if idle or (not ep and not cmd):
            # no main process: still resolve env/cwd/user for execs
            spec = resolve_process(config, command=["true"], entrypoint=[], env=env,
                                   workdir=d["workdir"], user=d["user"])
            self.doc["_defaults"] = [list(spec.env), spec.cwd, spec.user]
            return None
        spec = resolve_process(config, command=cmd, entrypoint=ep, env=env,
                               workdir=d["workdir"], user=d["user"])
        self.doc["_defaults"] = [list(spec.env), spec.cwd, spec.user]
        return spec

    # --- lifecycle (callers hold no lock; these take it)

    def start(self) -> None:
        """Boot the machine; a running one is left as it is (as ``docker start``)."""
        with self.lock:
            if self.state == "running" and not self.deleted:
                return
            self._require("start", "created", "stopped", "crashed")
            self._cancel_restart()
            self.doc["_user_stopped"] = False
            self._boot()

    def _boot(self) -> None:
        """Boot the machine and start its main process. Lock held."""
        self._set("starting")
        m: Machine | None = None
        follow = 0
        try:
            ports = self.mgr.assign_ports(self)
            config = self.mgr.machine_config(self.doc, ports)
            if self.doc.get("rootfs_size") and not self.doc.get("snapshot"):
                from ember.volumes.layer import LAYER_FILE, RootLayer

                # outside the state dir, which each start makes afresh: kept until rm
                config = dataclasses.replace(config, layer=RootLayer(
                    self.root / LAYER_FILE, int(self.doc["rootfs_size"])))
            if self.state_dir.exists():  # the last boot's, maybe under an older name
                shutil.rmtree(self.state_dir)
            self.doc["_vm_name"] = self.name
            self.root.mkdir(parents=True, exist_ok=True)
            keep: str | None = None
            if self.doc.get("snapshot"):
                m, process, follow = self._clone_machine(config)
            else:
                image = self.image()
                rootfs = self.mgr.store.rootfs(image)
                process = self.process(image.config)
                m = Machine.create(machines_dir=self.root, guest=self.mgr.guest(),
                                   rootfs=rootfs, accel=self.mgr.accel, config=config,
                                   name=self.name)
                # a clone of its shape's boot snapshot, if any
                if not self.doc.get("_cold"):
                    m, keep = self.mgr.warm(m)
            self.machine = m
            started = time.monotonic()

            def keep_boot(m: Machine = m) -> None:
                # the first boot of its shape: kept before its root is mounted
                from ember.snapshots.take import ImageInfo

                assert keep is not None
                self.mgr.keep_boot_snapshot(m, keep, ImageInfo.of(image.id, self.doc["image"],
                                                                  image.config))

            m.start(boot_timeout=self.mgr.boot_timeout,
                    progress=lambda msg: log.warning("%s", msg),
                    before_root=keep_boot if keep is not None else None)
            how = ("clone" if self.doc.get("snapshot") else
                   "warm" if m.spec.restore is not None else "boot")
            self.mgr.metrics.start_seconds.labels(how).observe(time.monotonic() - started)
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
            self._set(state, detail=detail, reason=detail, pid=None, finished_at=now(),
                      ports=[])
            if isinstance(exc, ManagerError):
                # exc, not a bare raise: a port error was replaced by its Conflict (409)
                raise exc from None
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
        elif follow and m.ready is not None and follow in (m.ready.extra.get("channels") or []):
            self._follow_main(m, follow, gen)

    def _clone_machine(self, config: MachineConfig) -> tuple[Machine, ProcessSpec | None, int]:
        """A clone of the machine's snapshot, its main process, and the snapshot's main
        channel to follow when the create request gave no command (0: none)."""
        from ember.snapshots.start import machine_from_snapshot
        from ember.snapshots.take import ImageInfo

        snap = self.mgr.snapshot_store.find(self.doc["snapshot"])
        if snap is None:
            raise Conflict(f"snapshot {self.doc['snapshot'][:12]} of machine {self.name} is "
                           "gone or damaged")
        man = snap.manifest
        own = self.doc["cmd"] is not None or self.doc["entrypoint"] is not None
        image_config = ImageInfo(man.image_id, man.image_ref, man.image_config).image_config()
        process = self.process(image_config, idle=not own and bool(man.main_channel))
        m = machine_from_snapshot(snap, self.mgr.host_identity(), machines_dir=self.root,
                                  config=config, name=self.name)
        return m, process, 0 if own else man.main_channel

    def _follow_main(self, m: Machine, channel: int, gen: int) -> None:
        """A clone's main process is its snapshot's, still running: follow its channel."""
        from ember.agent.protocol import ExecRequest

        assert m.agent is not None
        out = self._output()
        proc = m.agent.attach(channel, ExecRequest(argv=["(snapshot main process)"]),
                              on_stdout=out.write, on_stderr=out.write)
        self.main = proc
        self.doc["_main_channel"] = channel
        self.doc["_main_request"] = [list(proc.request.argv), [], "/", ""]
        self.save()
        threading.Thread(target=self._watch_main, args=(proc, gen), daemon=True,
                         name=f"ember-main-{self.name}").start()

    def take_snapshot(self, store: SnapshotStore, host: HostIdentity, tag: str) -> Snapshot:
        """Capture this running or paused machine into ``store``; it goes on afterwards."""
        from ember.snapshots.manifest import SnapshotError
        from ember.snapshots.take import ImageInfo, begin

        with self.lock:
            self._require("snapshot", "running", "paused")
            m = self.machine
            assert m is not None
            if self.doc.get("snapshot"):
                source = self.mgr.snapshot_store.find(self.doc["snapshot"])
                if source is None:
                    raise Conflict(f"the snapshot machine {self.name} was cloned from is gone")
                man = source.manifest
                info = ImageInfo(man.image_id, man.image_ref, man.image_config)
            else:
                image = self.image()
                info = ImageInfo.of(image.id, self.doc["image"], image.config)
            try:
                pending = begin(m, store)
                snap = pending.commit(image=info, host=host, tag=tag, parent=self.name,
                                      main_channel=int(self.doc.get("_main_channel") or 0),
                                      hostname=str(self.doc["hostname"]))
            except SnapshotError as exc:
                raise Conflict(str(exc)) from None
            self.mgr.events.publish(self.id, self.name, "snapshot",
                                    f"snapshot {snap.manifest.tag or snap.manifest.short_id} "
                                    f"taken (paused {snap.manifest.pause_ms:g} ms)")
            return snap

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
            self._ended()

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
            self._ended()

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
                                  "_main_channel": None, "ports": [],
                                  "limits": stopped_limits(self.doc.get("limits"))}
        if exit_code is not None:
            fields["exit_code"] = exit_code
        self._set(state, detail=reason, **fields)

    @staticmethod
    def _free_memory(m: Machine) -> None:
        with contextlib.suppress(OSError):
            m.spec.path(MachineSpec.MEMORY_FILE).unlink()

    def stop(self, timeout: float) -> None:
        """Stop the machine; one already stopped is left as it is (as ``docker stop``)."""
        with self.lock:
            self._stop(timeout)
            self._ended()

    def _stop(self, timeout: float) -> None:
        with self.lock:
            pending = self._cancel_restart()
            self.doc["_user_stopped"] = True
            if self.state not in ACTIVE:
                if pending:  # it was waiting to be restarted: now it is stopped for good
                    self._set("stopped", detail="stopped by request", reason="stopped by request")
                else:
                    self.save()
                return
            m = self.machine
            assert m is not None
            self._set("stopping")
            if self.doc.get("_paused"):
                self._qmp("cont")
                self.doc["_paused"] = False
            self._power_off(self.boot, "stopped", "stopped by request", grace=timeout)

    def kill(self, signum: int = signal.SIGKILL) -> None:
        """SIGKILL (the default): power off at once, exit code 137 as Docker records it.

        Any other signal goes to the main process, which decides what happens
        (its exit then ends the machine as usual).
        """
        with self.lock:
            if signum == signal.SIGKILL:
                pending = self._cancel_restart()
                if pending and self.state not in ACTIVE:  # killed while waiting to restart
                    self.doc["_user_stopped"] = True
                    self._set("stopped", detail="killed by request", reason="killed by request")
                    self._ended()
                    return
            self._require("kill", "running", "paused")
            if signum != signal.SIGKILL:
                if self.main is None or self.main.done():
                    raise Conflict(f"machine {self.name} has no main process to signal "
                                   "(kill it with SIGKILL, or stop it)")
                if self.state == "paused":
                    raise Conflict(f"machine {self.name} is paused: resume it to deliver "
                                   f"signal {signum}")
                try:
                    self.main.signal(signum)
                except AgentError as exc:
                    raise Conflict(f"machine {self.name}: {exc}") from None
                self.mgr.events.publish(self.id, self.name, "signalled", f"signal {signum}")
                return
            self.doc["_user_stopped"] = True
            self.doc["_paused"] = False
            self._finalize(self.boot, "stopped", "killed by request",
                           exit_code=128 + signal.SIGKILL)
            self._ended()

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
                                   f"or remove it by force (ember rm -f {self.name}; "
                                   "API: force=true)")
                self._finalize(self.boot, "stopped", "deleted")
            self._delete()

    def _ended(self) -> None:
        """A boot's end is recorded: a machine created with ``auto_remove`` goes now,
        unless its restart policy is about to boot it again. Lock held."""
        if self.doc.get("auto_remove") and self.restart_timer is None and not self.deleted \
                and self.state not in ACTIVE:
            self._delete()

    def _delete(self) -> None:
        """Forget the machine: its record, its directory, its pending restart. Lock held."""
        with self.lock:
            self._cancel_restart()
            self.deleted = True
            if self.output is not None:
                self.output.close()
            shutil.rmtree(self.root, ignore_errors=True)
            self.mgr.db.delete_machine(self.id)
            self.mgr.forget(self)
            self.mgr.events.publish(self.id, self.name, "deleted")


    def rename(self, new: str) -> None:
        """Give the machine another name (the manager checks it is free). Its hostname,
        set at create, stays, as with ``docker rename``."""
        with self.lock:
            if self.deleted:
                raise NotFound(f"no machine named {self.name}")
            old = self.name
            self.doc.setdefault("_vm_name", old)  # its QEMU's directory keeps the old name
            self.doc["name"] = new
            self.save()
            self.mgr.events.publish(self.id, new, "renamed", f"from {old}")

    def restart(self, timeout: float) -> None:
        """Stop (SIGTERM, ``timeout``, power off) if active, then start: ``docker restart``."""
        with self.lock:
            self._stop(timeout)  # not an end: an auto-remove machine stays
            self.start()

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
            started = time.monotonic()
            try:
                proc = m.exec(req, on_stdout=on_stdout, on_stderr=on_stderr)
            except AgentError as exc:
                raise Conflict(f"machine {self.name}: {exc}") from exc
            self.mgr.metrics.exec_seconds.observe(time.monotonic() - started)
            return proc

    def check_running(self, action: str) -> None:
        """Raise the 409 (404 once deleted) unless running; no lock: a hint, not a promise."""
        self._require(action, "running")

    def running_machine(self, action: str) -> Machine:
        with self.lock:
            self._require(action, "running")
            assert self.machine is not None
            return self.machine


def stopped_limits(limits: dict[str, str] | None) -> dict[str, str]:
    """The limits of a boot that ended: what was applied (and will be again), no cgroup."""
    return {k: v for k, v in (limits or {}).items() if k != "cgroup"}
