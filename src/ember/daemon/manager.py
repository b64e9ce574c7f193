"""The daemon's core: every machine of the host, its images, and the event log.

:class:`Manager` holds the machines (:class:`~ember.daemon.managed.Managed`,
one per machine, each with its own lock), the image store, port assignment
across machines, lookup, create, and the re-adoption of running machines when
the daemon starts (:meth:`Manager.recover`). The errors the API turns into 4xx
are in :mod:`ember.daemon.errors`, the event log in :mod:`ember.daemon.events`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember import paths
from ember.api import models
from ember.daemon import egress
from ember.daemon.db import StateDB
from ember.daemon.errors import Conflict, Invalid, ManagerError, NotFound
from ember.daemon.events import EventBus, now
from ember.daemon.managed import Managed
from ember.daemon.snapshots import Snapshots
from ember.daemon.states import ACTIVE
from ember.errors import AmbiguousImage, EmberError, ImageConflict, ImageError, ImageNotFound
from ember.guest.bundle import GuestBundle, ensure_guest
from ember.host.probe import AccelChoice, choose_accel
from ember.host.resources import ShapeError, check_machine_shape
from ember.images import ImageStore
from ember.machine import Machine, MachineConfig
from ember.util import log
from ember.vmm import network
from ember.vmm.egress import EgressPolicy
from ember.volumes import layer
from ember.volumes import store as vstore
from ember.volumes.shares import ShareError, ShareMount, share

if TYPE_CHECKING:
    from ember.images.store import Image, Imported, Removal

# still importable from here, where they were defined before the split
__all__ = ["ACTIVE", "Conflict", "Invalid", "Managed", "Manager", "ManagerError", "NotFound"]


class Manager(Snapshots):
    """All machines, images and snapshots of one Ember home."""

    def __init__(self, home: Path | None = None, *, accel: str | None = None,
                 boot_timeout: float = 60.0) -> None:
        self.home = home or paths.data_dir()
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = StateDB(self.home / "state.db")
        self.events = EventBus(self.db)
        self.store = ImageStore(paths.images_dir())
        self.volume_store = vstore.VolumeStore(paths.volumes_dir())
        self.machines_root = paths.machines_dir() / "daemon"
        self.machines_root.mkdir(parents=True, exist_ok=True)
        self.accel: AccelChoice = choose_accel(accel)
        self.boot_timeout = boot_timeout
        self._lock = threading.Lock()
        self._images_lock = threading.Lock()
        #: held from "which machines use which image" to the end of a removal, and from
        #: resolving a create's image to registering the machine: no machine is ever
        #: created from an image that is being deleted
        self._image_use = threading.Lock()
        #: uploads being received (not the store's tmp/, which every store mutation sweeps)
        self.uploads_dir = self.home / "uploads"
        shutil.rmtree(self.uploads_dir, ignore_errors=True)  # a killed daemon's
        self.uploads_dir.mkdir(mode=0o700)
        self._machines: dict[str, Managed] = {}
        from ember.daemon.metrics import Metrics

        self.metrics = Metrics(self)
        #: started by ``ember serve`` (daemon/server.py), stopped by :meth:`close`
        self.egress_watch = egress.EgressWatch(self)
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
        kwargs["egress"] = EgressPolicy.from_json(doc.get("egress"))
        kwargs["volumes"] = self.volume_mounts(doc.get("volumes") or [])
        kwargs["shares"] = tuple(ShareMount.from_json(d) for d in doc.get("shares") or [])
        return MachineConfig(**kwargs)

    def volume_mounts(self, specs: list[dict[str, Any]]) -> tuple[vstore.VolumeMount, ...]:
        """A machine's volume requests (as its record keeps them) resolved for a start.

        Raises:
            Conflict: a volume was removed since the machine was created.
        """
        out = []
        for spec in specs:
            req = vstore.VolumeRequest(spec["name"], spec["target"], bool(spec["readonly"]))
            try:
                out.append(self.volume_store.mount(req))
            except vstore.VolumeNotFound as exc:
                raise Conflict(f"{exc} (removed since the machine was created)") from None
        return tuple(out)

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
            # any unique prefix of an id, as Docker takes them
            hits = [mm for mm in self._machines.values() if ref and mm.id.startswith(ref)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise Conflict(f"machine id prefix {ref!r} is ambiguous ({len(hits)} machines "
                           "match): give more of the id, or the name")
        raise NotFound(f"no machine named {ref!r}")

    def rename(self, mm: Managed, new: str) -> None:
        if not models.valid_name(new):
            raise Invalid(f"invalid machine name {new!r}: letters, digits, '_', '.', '-', "
                          "at most 63 characters, starting with a letter or digit")
        # Lock order as everywhere: the machine's, then the manager's (a boot holds its
        # machine's lock while it asks the manager for ports).
        with mm.lock, self._lock:
            if any(x.name == new and x is not mm for x in self._machines.values()):
                raise Conflict(f"a machine named {new} exists already")
            mm.rename(new)

    def all(self) -> list[Managed]:
        with self._lock:
            return list(self._machines.values())

    def forget(self, mm: Managed) -> None:
        with self._lock:
            self._machines.pop(mm.id, None)

    # --- machines

    def create(self, body: models.MachineCreate) -> Managed:
        with self._image_use:
            if body.snapshot is not None:
                return self.create_from_snapshot(body)
            assert body.image is not None
            image = self.image(body.image)
            return self._create_doc(body, {"image": body.image, "image_id": image.id})

    def _create_doc(self, body: models.MachineCreate, fields: dict[str, Any]) -> Managed:
        """Register a new machine from ``body``; ``fields`` (the image, or the snapshot and
        the shape it imposes) take precedence over the body's."""
        try:
            check_machine_shape(fields.get("cpus", body.cpus),
                                fields.get("memory_mib", body.memory_mib))
        except ShapeError as exc:
            raise Invalid(str(exc)) from None
        if body.auto_remove and body.restart != models.RestartPolicy.no:
            raise Invalid("auto_remove and a restart policy exclude each other: a machine "
                          "that is removed when it stops cannot be restarted")
        if body.network == models.NetworkMode.none and body.ports:
            raise Invalid("ports cannot be published with network none")
        mid = secrets.token_hex(6)
        name = body.name or f"ember-{mid[:6]}"
        policy = egress.policy_of(body.egress)
        egress.check_create(name, fields.get("network", body.network.value), policy)
        vols, shares = self._mount_specs(body)
        seen = set()
        for p in body.ports:
            if p.host_port and (p.host_ip, p.host_port) in seen:
                raise Invalid(f"host port {p.host_port} is published twice")
            seen.add((p.host_ip, p.host_port))
        doc: dict[str, Any] = {
            "id": mid, "name": name, "snapshot": None,
            "state": "created", "cpus": body.cpus, "memory_mib": body.memory_mib,
            "env": dict(body.env), "cmd": body.cmd, "entrypoint": body.entrypoint,
            "workdir": body.workdir, "user": body.user, "hostname": body.hostname or name,
            "network": body.network.value, "ports": [],
            "publish": [p.model_dump() for p in body.ports], "auto_remove": body.auto_remove,
            "_cold": body.cold, "egress": egress.as_record(policy), "volumes": vols,
            "shares": shares,
            # a root layer on disk unless asked for memory (a clone's is its snapshot's)
            "rootfs_size": (None if body.tmpfs_root or body.snapshot is not None
                            else body.rootfs_size or layer.DEFAULT_SIZE),
            "restart": body.restart.value, "restart_count": 0, "created_at": now(),
            "started_at": None, "finished_at": None, "exit_code": None, "reason": None,
            "pid": None, "accel": None, "limits": {},
            "_port_specs": [p.model_dump() for p in body.ports], "_user_stopped": False,
        }
        doc.update(fields)
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

    def _mount_specs(self, body: models.MachineCreate
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The create's volumes and shares, checked together (422), the volumes found
        (404), as the record keeps them."""
        vols, mounts = self._volume_specs(body)
        shares = self._share_specs(body)
        try:
            vstore.check_mounts(mounts, shares)
        except vstore.VolumeError as exc:
            raise Invalid(str(exc)) from None
        return vols, [m.to_json() for m in shares]

    def _volume_specs(self, body: models.MachineCreate
                      ) -> tuple[list[dict[str, Any]], tuple[vstore.VolumeMount, ...]]:
        """The create's volumes, checked (422) and found (404): as the record keeps them,
        and resolved."""
        if not body.volumes:
            return [], ()
        if body.snapshot is not None:
            raise Invalid("a clone of a snapshot cannot mount volumes: its guest's memory "
                          "would not match their disks")
        try:
            reqs = [vstore.validated(vstore.VolumeRequest(v.name, v.target, v.readonly))
                    for v in body.volumes]
            mounts = tuple(self.volume_store.mount(r) for r in reqs)
        except vstore.VolumeNotFound as exc:
            raise NotFound(str(exc)) from None
        except vstore.VolumeError as exc:
            raise Invalid(str(exc)) from None
        return [{"name": r.name, "target": r.target, "readonly": r.readonly}
                for r in reqs], mounts

    def _share_specs(self, body: models.MachineCreate) -> tuple[ShareMount, ...]:
        """The create's host shares, checked (422): each a directory of this host, its
        symlinks resolved (``volumes/shares.py``)."""
        if not body.shares:
            return ()
        if body.snapshot is not None:
            raise Invalid("a clone of a snapshot cannot have host shares: its guest's memory "
                          "would not match their files")
        try:
            return tuple(share(s.source, s.target, s.readonly) for s in body.shares)
        except (ShareError, vstore.VolumeError) as exc:
            raise Invalid(str(exc)) from None

    # --- volumes

    def volumes(self) -> list[vstore.Volume]:
        return self.volume_store.list()

    def volume(self, name: str) -> vstore.Volume:
        try:
            return self.volume_store.get(name)
        except vstore.VolumeNotFound as exc:
            raise NotFound(str(exc)) from None

    def create_volume(self, name: str, size: int | None = None) -> vstore.Volume:
        try:
            return self.volume_store.create(name, vstore.DEFAULT_SIZE if size is None
                                            else size)
        except vstore.VolumeExists as exc:
            raise Conflict(str(exc)) from None
        except vstore.VolumeError as exc:
            raise Invalid(str(exc)) from None

    def remove_volume(self, name: str) -> None:
        """Delete a volume; a stopped machine that names it fails its next start (409)."""
        try:
            self.volume_store.remove(name)
        except vstore.VolumeNotFound as exc:
            raise NotFound(str(exc)) from None
        except vstore.VolumeInUse as exc:
            raise Conflict(str(exc)) from None

    # --- images

    def images(self) -> list[Image]:
        return self.store.list()

    def image(self, ref: str) -> Image:
        try:
            return self.store.resolve(ref)
        except ImageNotFound as exc:
            raise NotFound(str(exc)) from None
        except AmbiguousImage as exc:
            raise Conflict(str(exc)) from None
        except ImageError as exc:
            raise Invalid(str(exc)) from None

    def image_users(self) -> dict[str, list[str]]:
        """Image id -> names of the machines (in any state) created from it, and of the
        snapshots taken of them (a snapshot needs its image's root filesystem)."""
        out: dict[str, list[str]] = {}
        for mm in self.all():
            out.setdefault(mm.doc["image_id"], []).append(mm.name)
        for snap in self.snapshots():
            out.setdefault(snap.manifest.image_id, []).append(
                f"snapshot {snap.manifest.tag or snap.manifest.short_id}")
        return {k: sorted(v) for k, v in out.items()}

    def pull_image(self, ref: str, platform: str | None,
                   on_event: Callable[[dict[str, Any]], None] | None = None,
                   ca_cert: str | None = None) -> Imported:
        """Pull ``ref`` from its registry into the store (``images/registry/pull.py``),
        with the daemon's own credentials and ``registries.conf``."""
        from ember.images.registry.pull import pull

        ca = None
        if ca_cert is not None:
            ca = Path(ca_cert)
            if not ca.is_absolute() or not ca.is_file():
                raise Invalid(f"ca_cert {ca_cert!r} is not an absolute path of a file on the "
                              "daemon's host")
        result = pull(self.store, ref, platform=platform, on_event=on_event, ca_cert=ca)
        log.info("pulled %s (%d layers fetched, %d bytes) as %s", result.reference,
                 result.fetched, result.bytes, result.imported.image.id)
        return result.imported

    def import_image(self, path: Path, tag: str | None) -> Imported:
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
                result = self.store.import_archive(path, tag=tag)
                self.store.rootfs(result.image)
            except ImageError as exc:
                raise Invalid(str(exc)) from None
        for move in result.moved:
            log.info("image import: tag %s moved from image %s to %s", move.tag,
                     move.from_id, move.to_id)
        return result

    def tag_image(self, ref: str, tag: str) -> Image:
        image = self.image(ref)
        try:
            return self.store.tag(image.id, tag)
        except ImageNotFound as exc:  # removed meanwhile
            raise NotFound(str(exc)) from None
        except ImageError as exc:  # an invalid tag
            raise Invalid(str(exc)) from None

    def remove_image(self, ref: str, force: bool = False) -> Removal:
        """Untag or delete, as ``docker rmi``: see :meth:`ImageStore.remove`."""
        with self._image_use:
            try:
                return self.store.remove(ref, force=force, users=self.image_users())
            except ImageNotFound as exc:
                raise NotFound(str(exc)) from None
            except (ImageConflict, AmbiguousImage) as exc:
                raise Conflict(str(exc)) from None
            except ImageError as exc:
                raise Invalid(str(exc)) from None

    def prune_images(self, all: bool = False) -> Removal:
        with self._image_use:
            return self.store.prune(all=all, users=self.image_users())

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
        self.egress_watch.stop()
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
