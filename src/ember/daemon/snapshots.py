"""The daemon's snapshots: taking them of its machines, listing, removing, and clones.

A mixin of :class:`~ember.daemon.manager.Manager`. A snapshot is taken under
the machine's lock (no lifecycle action interleaves with the capture); the
machine is stopped only for the capture itself and goes on running (a paused
one stays paused). Clones are ordinary daemon machines whose record names
their snapshot (``snapshot``): each start of one is a fresh clone of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from typing import TYPE_CHECKING, Any

from ember import paths
from ember.api import models
from ember.daemon.errors import Conflict, Invalid, NotFound
from ember.errors import EmberError
from ember.snapshots.compat import HostIdentity, host_identity
from ember.snapshots.manifest import SnapshotError
from ember.snapshots.store import Snapshot, SnapshotInUse, SnapshotNotFound, SnapshotStore
from ember.util import log

if TYPE_CHECKING:
    from ember.daemon.managed import Managed
    from ember.host.probe import AccelChoice
    from ember.machine import Machine
    from ember.snapshots.take import ImageInfo


class Snapshots:
    """Snapshot operations of the manager (which provides ``get``, ``all``, ``accel``...)."""

    accel: AccelChoice

    if TYPE_CHECKING:
        def all(self) -> list[Managed]: ...
        def get(self, ref: str) -> Managed: ...
        def _create_doc(self, body: models.MachineCreate,
                        fields: dict[str, Any]) -> Managed: ...

    _host: HostIdentity | None = None
    _host_lock = threading.Lock()

    @property
    def snapshot_store(self) -> SnapshotStore:
        return SnapshotStore(paths.snapshots_dir(), "user")

    @property
    def boot_snapshot_store(self) -> SnapshotStore:
        return SnapshotStore(paths.boot_snapshots_dir(), "boot")

    def host_identity(self) -> HostIdentity:
        with self._host_lock:
            if self._host is None:
                self._host = host_identity(self.accel.name, paths.cache_dir())
            return self._host

    # --- reading

    def snapshots(self, include_boot: bool = False) -> list[Snapshot]:
        out = self.snapshot_store.all()
        if include_boot:
            out += self.boot_snapshot_store.all()
        return out

    def snapshot(self, ref: str) -> Snapshot:
        try:
            return self.snapshot_store.get(ref)
        except SnapshotNotFound as exc:
            try:
                return self.boot_snapshot_store.get(ref)
            except SnapshotError:
                raise NotFound(str(exc)) from None
        except SnapshotError as exc:
            raise Conflict(str(exc)) from None

    def clones_of(self, snap_id: str) -> list[str]:
        return sorted(mm.name for mm in self.all() if mm.doc.get("snapshot") == snap_id)

    def snapshot_model(self, snap: Snapshot) -> models.Snapshot:
        m = snap.manifest
        store = self.snapshot_store if m.kind == "user" else self.boot_snapshot_store
        return models.Snapshot(
            id=m.id, kind=m.kind, tag=m.tag or None, parent=m.parent or None, created=m.created,  # type: ignore[arg-type]
            image=m.image_ref, image_id=m.image_id, cpus=m.cpus, memory_mib=m.memory_mib,
            network=models.NetworkMode(m.network), accel=m.accel, qemu_version=m.qemu_version,
            size_on_disk=m.size_on_disk, memory_allocated=m.memory_allocated,
            pause_ms=m.pause_ms, in_use=store.in_use(snap), clones=self.clones_of(m.id))

    # --- taking and removing

    def take_snapshot(self, mm: Managed, tag: str | None) -> Snapshot:
        """Snapshot the running (or paused) machine ``mm``; it goes on afterwards."""
        # checked before the capture too, so a taken tag costs the machine no pause
        if tag and any(s.manifest.tag == tag for s in self.snapshot_store.all()):
            raise Conflict(f"a snapshot tagged {tag!r} exists already")
        return mm.take_snapshot(self.snapshot_store, self.host_identity(), tag or "")

    def remove_snapshot(self, ref: str, force: bool = False) -> None:
        """Delete a user snapshot; with ``force``, the daemon's clones of it first."""
        store = self.snapshot_store
        try:
            snap = store.get(ref)
        except SnapshotNotFound as exc:
            raise NotFound(str(exc)) from None
        except SnapshotError as exc:
            if not (paths.snapshots_dir() / ref).is_dir():
                raise Conflict(str(exc)) from None
            try:
                store.remove(ref)  # a damaged snapshot, named by its id
            except SnapshotInUse as exc2:
                raise Conflict(str(exc2)) from None
            return
        clones = [mm for mm in self.all() if mm.doc.get("snapshot") == snap.id]
        if clones and not force:
            raise Conflict(f"snapshot {snap.manifest.tag or snap.manifest.short_id} has clones "
                           f"({', '.join(sorted(mm.name for mm in clones))}): remove them "
                           "first, or force")
        for mm in clones:
            mm.remove(force=True)
        try:
            store.remove(snap.id)
        except SnapshotInUse as exc:
            raise Conflict(str(exc)) from None

    # --- warm starts of image machines

    def warm(self, machine: Machine) -> tuple[Machine, str | None]:
        """``machine`` (created, not started) as a clone of its shape's boot snapshot, if
        there is one; else itself, and the key under which to keep one after its boot
        (None: warm starts are off)."""
        from ember.snapshots import start as snapstart
        from ember.snapshots.take import boot_key

        try:
            if snapstart.boot_cache_cap() <= 0:
                return machine, None
            host = self.host_identity()
            key = boot_key(machine.spec, host)
            restore = snapstart.find_boot_snapshot(self.boot_snapshot_store, key,
                                                   machine.spec, host)
        except (EmberError, OSError) as exc:
            log.warning("no warm start for %s: %s", machine.name, exc)
            return machine, None
        if restore is None:
            return machine, key
        # a copy, not a shared mapping: a daemon machine is snapshotted as fast as a
        # booted one, and nothing ties it to the (evictable) boot snapshot
        return snapstart.as_clone(machine, dataclasses.replace(restore, copy=True)), None

    def keep_boot_snapshot(self, machine: Machine, key: str, image: ImageInfo) -> None:
        """Capture a freshly booted machine (before its main process) for later warm
        starts of its shape; committed on a thread. Failures only cost a warm start."""
        from ember.snapshots import start as snapstart
        from ember.snapshots.take import begin

        store = self.boot_snapshot_store
        try:
            pending = begin(machine, store, key)
        except (EmberError, OSError) as exc:
            log.warning("no boot snapshot kept: %s", exc)
            return

        def commit() -> None:
            try:
                pending.commit(image=image, host=self.host_identity(),
                               hostname=machine.hostname, boot_key=key)
                store.evict(snapstart.boot_cache_cap(), keep=key)
            except (EmberError, OSError) as exc:
                log.warning("no boot snapshot kept: %s", exc)

        threading.Thread(target=commit, name="ember-boot-snapshot", daemon=True).start()

    # --- clones

    def create_from_snapshot(self, body: models.MachineCreate) -> Managed:
        assert body.snapshot is not None
        snap = self.snapshot(body.snapshot)
        m = snap.manifest
        if m.kind != "user":
            raise Invalid("boot snapshots are ember run's cache: snapshot a machine to clone it")
        given = body.model_fields_set
        for field, have in (("cpus", m.cpus), ("memory_mib", m.memory_mib),
                            ("network", m.network)):
            want = getattr(body, field)
            want = want.value if isinstance(want, models.NetworkMode) else want
            if field in given and want != have:
                raise Invalid(f"snapshot {m.tag or m.short_id} is of a machine with "
                              f"{field} {have}: a clone has the shape of its snapshot")
        if body.network == models.NetworkMode.none and body.ports:
            raise Invalid("ports cannot be published with network none")
        return self._create_doc(body, {
            "image": m.image_ref, "image_id": m.image_id, "snapshot": m.id,
            "cpus": m.cpus, "memory_mib": m.memory_mib, "network": m.network,
        })

    def clone(self, mm: Managed, count: int, tag: str | None) -> tuple[Snapshot, list[Managed]]:
        """Snapshot ``mm`` and start ``count`` clones of it (named after it: NAME-1, ...).

        The clones start in parallel (a few at a time: each start is mostly QEMU's
        and the guest's CPU). If one cannot start, it is removed, the others are
        kept, and the error says how many started.
        """
        from concurrent.futures import ThreadPoolExecutor

        snap = self.take_snapshot(mm, tag)
        names = {x.name for x in self.all()}
        made: list[Managed] = []
        i = 0
        for _ in range(count):
            i += 1
            while f"{mm.name}-{i}" in names:
                i += 1
            body = models.MachineCreate(snapshot=snap.id, name=f"{mm.name}-{i}",
                                        restart=models.RestartPolicy(mm.doc["restart"]),
                                        ports=[models.PortSpec(host_ip=p["host_ip"],
                                                               host_port=0,
                                                               guest_port=p["guest_port"])
                                               for p in mm.doc.get("_port_specs") or []],
                                        # a clone keeps its source's policy: no way around it
                                        egress=models.Egress.model_validate(mm.doc["egress"])
                                        if mm.doc.get("egress") else None)
            made.append(self.create_from_snapshot(body))
        workers = max(1, min(len(made), 2 * (os.cpu_count() or 1)))
        with ThreadPoolExecutor(workers, thread_name_prefix="ember-clone") as pool:
            outcomes = list(pool.map(_start, made))
        failed = [(c, exc) for c, exc in zip(made, outcomes, strict=True) if exc is not None]
        for c, _ in failed:
            with contextlib.suppress(Exception):
                c.remove(force=True)
        if failed:
            started = len(made) - len(failed)
            raise Conflict(f"{len(failed)} of {count} clones of {mm.name} could not start "
                           f"({started} did): {failed[0][1]}")
        return snap, made


def _start(mm: Managed) -> BaseException | None:
    try:
        mm.start()
        return None
    except Exception as exc:  # reported by the caller, with the others'
        return exc
