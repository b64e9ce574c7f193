"""Starting machines from snapshots: warm starts from boot snapshots, and ``--from SNAP``.

Warm by default: for each machine shape (``take.boot_key``) the boot-snapshot
store keeps a snapshot of a freshly booted, idle machine, taken right after
the agent's READY by the first run of that shape. Every later run of the same
shape starts as a clone of it: the guest comes up as it was at READY, gets a
fresh identity (``AgentClient.identity``) and runs the command. A boot
snapshot that fails a check (another QEMU, a changed file, damage) is removed
and the run boots cold, which takes a new one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from ember import paths
from ember.errors import EmberError
from ember.machine import Machine, MachineConfig
from ember.snapshots.compat import HostIdentity, check_compatible
from ember.snapshots.manifest import SnapshotError
from ember.snapshots.store import Snapshot, SnapshotStore
from ember.snapshots.take import check_shape
from ember.util import log
from ember.vmm.network import BACKEND_SLIRP, NETWORK_USER, default_backend
from ember.vmm.spec import DriveSpec, MachineSpec, RestoreSpec
from ember.volumes.layer import LAYER_FILE, RootLayer

#: The boot-snapshot cache's default cap (``EMBER_BOOT_CACHE``, e.g. ``512m``; 0 disables).
DEFAULT_BOOT_CACHE = 2 << 30


def boot_store() -> SnapshotStore:
    return SnapshotStore(paths.boot_snapshots_dir(), "boot")


def user_store() -> SnapshotStore:
    return SnapshotStore(paths.snapshots_dir(), "user")


def boot_cache_cap() -> int:
    """Bytes the boot snapshots may take on disk (``$EMBER_BOOT_CACHE``; default 2 GiB)."""
    raw = os.environ.get("EMBER_BOOT_CACHE", "").strip().lower()
    if not raw:
        return DEFAULT_BOOT_CACHE
    text = raw.removesuffix("ib").removesuffix("b")
    scale = 1 << 20
    if text[-1:] in ("k", "m", "g"):
        scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[text[-1]]
        text = text[:-1]
    if not text.isdigit():
        raise EmberError(f"EMBER_BOOT_CACHE={raw!r} is not a size (MiB, or e.g. 512m, 2g; "
                         "0 turns warm starts off)")
    return int(text) * scale


def find_boot_snapshot(store: SnapshotStore, key: str, spec: MachineSpec,
                       host: HostIdentity) -> RestoreSpec | None:
    """The boot snapshot of ``key``, checked, or None (a damaged or stale one is removed)."""
    snap = store.find(key)
    if snap is None:
        return None
    try:
        check_compatible(snap.manifest, host)
        check_shape(snap.manifest, spec)
        restore = snap.restore_spec()
    except SnapshotError as exc:
        log.warning("boot snapshot %s dropped: %s", key[:12], exc)
        with contextlib.suppress(EmberError, OSError):
            store.remove(key)
        return None
    snap.touch()
    return restore


def as_clone(machine: Machine, restore: RestoreSpec) -> Machine:
    """``machine`` (created, not started) made to start from ``restore`` instead of booting."""
    spec = dataclasses.replace(machine.spec, restore=restore)
    return Machine(spec, ephemeral=machine.ephemeral, hostname=machine.hostname)


def machine_from_snapshot(snap: Snapshot, host: HostIdentity, *, machines_dir: Path,
                          config: MachineConfig, name: str) -> Machine:
    """A machine (created, not started) that starts as a clone of the user snapshot ``snap``.

    Its shape is the snapshot's: vCPUs, memory, network mode, kernel, initramfs
    and root filesystem; its name, hostname and published ports are its own.

    Raises:
        SnapshotError: the snapshot cannot be restored here (one line says why),
            or it is damaged.
    """
    m = snap.manifest
    check_compatible(m, host)
    if config.cpus != m.cpus or config.memory_mib != m.memory_mib:
        raise SnapshotError(f"snapshot {m.tag or m.short_id} is of a machine with {m.cpus} "
                            f"vCPU and {m.memory_mib} MiB: a clone has the shape of its "
                            "snapshot (drop --cpus/-m, or give the same)")
    if config.mounts_host_data:
        raise SnapshotError(f"snapshot {m.tag or m.short_id}: a clone cannot have volumes or "
                            "shares (its guest would hold another file system's state); boot "
                            "the image")
    if config.network != m.network:
        raise SnapshotError(f"snapshot {m.tag or m.short_id} is of a machine with network "
                            f"{m.network}: a clone has the network mode of its snapshot")
    restore = snap.restore_spec()
    spec = MachineSpec(
        name=name, state_dir=machines_dir / name, kernel=Path(m.kernel.path),
        initramfs=Path(m.initramfs.path), cmdline=m.cmdline, cpus=m.cpus,
        memory_mib=m.memory_mib, accel=m.accel,
        drives=(DriveSpec(Path(m.rootfs.path), readonly=True),), network=m.network,
        net_backend=default_backend() if m.network == NETWORK_USER else BACKEND_SLIRP,
        ports=config.ports, egress=config.egress, limit_resources=config.limit_resources,
        restore=restore,
        # a copy of the snapshot's root layer, its own (each start of a clone is afresh)
        layer=(RootLayer(machines_dir / name / LAYER_FILE, snap.layer_size)
               if restore.layer is not None else None))
    check_shape(m, spec)  # the devices, and the kernel, initramfs and rootfs still there
    snap.touch()
    return Machine(spec, ephemeral=config.ephemeral, hostname=config.hostname)
