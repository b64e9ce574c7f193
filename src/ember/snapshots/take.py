"""Taking a snapshot of a running machine: capture (short: the guest is stopped), then commit.

``begin`` stops the guest only for as long as the capture needs (device state
and a sparse copy of its memory, ``vmm/snapshot.py``) and returns with the
machine running again. ``Pending.commit`` does the slow part while the machine
runs: hashes of what the snapshot depends on, syncing the files, the manifest,
and the rename into place. ``ember run`` commits its boot snapshot on a thread
while the user's command already runs.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ember.images.oci import ImageConfig
from ember.machine import Machine
from ember.snapshots.compat import HostIdentity
from ember.snapshots.manifest import FileRef, Manifest, SnapshotError, sha256_bytes
from ember.snapshots.store import Snapshot, SnapshotStore, disk_usage
from ember.vmm.network import BACKEND_TAP, NETWORK_USER
from ember.vmm.snapshot import STATE_FILE, Capture, capture
from ember.vmm.spec import MachineSpec


@dataclass(frozen=True)
class ImageInfo:
    """The image a snapshot's machine runs: what a command at a clone's start resolves against."""

    id: str
    ref: str
    config: dict[str, Any]

    @classmethod
    def of(cls, image_id: str, ref: str, config: ImageConfig) -> ImageInfo:
        return cls(image_id, ref, config_to_json(config))

    def image_config(self) -> ImageConfig:
        return ImageConfig.from_json({"config": self.config})


def config_to_json(c: ImageConfig) -> dict[str, Any]:
    return {"Env": list(c.env), "Entrypoint": None if c.entrypoint is None else list(c.entrypoint),
            "Cmd": None if c.cmd is None else list(c.cmd), "WorkingDir": c.working_dir,
            "User": c.user, "StopSignal": c.stop_signal}


@dataclass
class Pending:
    """A captured snapshot not yet committed to its store."""

    store: SnapshotStore
    id: str
    tmp: Path
    lock: int
    spec: MachineSpec
    capture: Capture

    def commit(self, *, image: ImageInfo, host: HostIdentity, tag: str = "", parent: str = "",
               main_channel: int = 0, hostname: str = "", boot_key: str = "") -> Snapshot:
        """Write the manifest and move the snapshot into place (see ``SnapshotStore.commit``).

        Raises:
            SnapshotError: a tag clash, or the files cannot be written.
        """
        try:
            spec = self.spec
            state = (self.tmp / STATE_FILE).read_bytes()
            manifest = Manifest(
                id=self.id, kind=self.store.kind,
                created=datetime.now(UTC).isoformat(timespec="milliseconds").replace(
                    "+00:00", "Z"),
                qemu_version=host.qemu_version, qemu_build=host.qemu_build, accel=spec.accel,
                cpu_model=host.cpu_model, cpus=spec.cpus, memory_mib=spec.memory_mib,
                network=spec.network, devices=devices(spec),
                kernel=FileRef.of(spec.kernel), initramfs=FileRef.of(spec.initramfs),
                rootfs=FileRef.of(spec.drives[0].path), cmdline=spec.cmdline,
                image_id=image.id, image_ref=image.ref, image_config=image.config,
                state_size=len(state), state_sha256=sha256_bytes(state),
                memory_size=self.capture.memory_size,
                memory_allocated=self.capture.memory_bytes,
                size_on_disk=disk_usage(self.tmp),
                pause_ms=round(self.capture.pause_s * 1000, 1), tag=tag, parent=parent,
                main_channel=main_channel, hostname=hostname, boot_key=boot_key,
            )
        except OSError as exc:
            self.discard()
            raise SnapshotError(f"cannot write snapshot {self.id[:12]}: {exc}") from exc
        except BaseException:
            self.discard()
            raise
        return self.store.commit(self.tmp, self.lock, manifest)

    def discard(self) -> None:
        self.store.discard(self.tmp, self.lock)


def begin(machine: Machine, store: SnapshotStore, snap_id: str | None = None) -> Pending:
    """Capture ``machine`` into a new temporary snapshot directory of ``store``.

    ``snap_id``: the id to use (a boot snapshot's is its shape's key); default: random.

    Raises:
        SnapshotError: the machine cannot be captured (nothing is left behind).
    """
    from ember.errors import VMMError

    if machine.vm is None:
        raise SnapshotError(f"machine {machine.name} is not running")
    if machine.spec.mounts_host_data and machine.root_mounted:
        what = "volumes" if machine.spec.volumes else "host shares"
        raise SnapshotError(f"cannot snapshot {machine.name}: it has {what}, whose file "
                            "systems its guest holds in memory; a clone would pair that "
                            "state with other contents")
    snap_id, tmp, lock = store.new_tmp(snap_id)
    try:
        # a running machine's root layer is in the snapshot; a boot snapshot, taken
        # before the guest mounts its root, has none
        cap = capture(machine.vm, tmp, layer=machine.root_mounted)
    except VMMError as exc:
        store.discard(tmp, lock)
        raise SnapshotError(f"cannot snapshot {machine.name}: {exc}") from exc
    except BaseException:
        store.discard(tmp, lock)
        raise
    return Pending(store, snap_id, tmp, lock, machine.spec, cap)


def devices(spec: MachineSpec) -> tuple[str, ...]:
    """The machine's devices in command-line order (which decides their virtio-mmio slots)."""
    out = ["virtio-serial", *(f"virtio-blk:{'ro' if d.readonly else 'rw'}" for d in spec.drives)]
    if spec.layer is not None:  # its size, which the guest probed; not which file it is
        out.append(f"virtio-blk:layer:{spec.layer.size}")
    if spec.network == NETWORK_USER:
        # "user" is slirp's (the name snapshots made before the tap have)
        out.append("virtio-net:tap" if spec.net_backend == BACKEND_TAP else "virtio-net:user")
    if spec.volumes:  # the guest probed each LUN (a clone rescans its own, mounts.c)
        out.append("virtio-scsi:" + "".join("r" if v.readonly else "w" for v in spec.volumes))
    if spec.shares:
        out.append("virtio-9p")
    return tuple(out)


def boot_key(spec: MachineSpec, host: HostIdentity) -> str:
    """The key of a machine shape's boot snapshot.

    It covers everything a clone must share with the machine the snapshot was
    taken of: the QEMU build, accelerator and CPU model, vCPUs, memory, network
    mode and devices, and the kernel, initramfs and rootfs (by path and
    ``stat``: Ember's caches name them by content, and the stat catches a
    rebuild). The guest command line counts, less the hostname (a clone gets
    its own from the identity refresh).
    """
    parts: list[str] = [host.qemu_build, host.accel, host.cpu_model, str(spec.cpus),
                        str(spec.memory_mib), spec.network, ",".join(devices(spec)),
                        re.sub(r"\s*ember\.hostname=\S+", "", spec.cmdline)]
    for path in (spec.kernel, spec.initramfs, *(d.path for d in spec.drives)):
        st = os.stat(path)
        parts.append(f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def check_shape(m: Manifest, spec: MachineSpec) -> None:
    """Refuse to start ``spec`` from a snapshot taken of a machine of another shape.

    Raises:
        SnapshotError: one line naming the first difference.
    """
    what = f"snapshot {m.tag or m.short_id}"
    for name, have, want in (("vCPUs", spec.cpus, m.cpus), ("memory (MiB)", spec.memory_mib,
                                                             m.memory_mib),
                             ("network", spec.network, m.network),
                             ("devices", ",".join(devices(spec)), ",".join(m.devices))):
        if have != want:
            raise SnapshotError(f"{what} is of a machine with {name} {want}, not {have}: "
                                "a clone has the shape of its snapshot")
    m.kernel.check("kernel")
    m.initramfs.check("initramfs")
    m.rootfs.check("root filesystem")

