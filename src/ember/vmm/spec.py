"""What a machine is made of: a frozen, validated record, and its state directory.

A ``MachineSpec`` is all the VMM needs to start a machine; it is written to
``spec.json`` in the state directory so a later process (a restarted daemon)
can re-adopt the machine. Paths inside the state directory are derived, never
stored twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import EmberError, VMMError
from ember.vmm.egress import EgressPolicy
from ember.vmm.network import (
    BACKEND_TAP,
    NET_BACKENDS,
    NETWORK_NONE,
    NETWORK_USER,
    PortMapping,
    check_network,
)
from ember.volumes.layer import RootLayer
from ember.volumes.shares import ShareMount
from ember.volumes.store import VolumeMount

MIN_MEMORY_MIB = 64
MAX_MEMORY_MIB = 256 * 1024
MAX_CPUS = 64
#: Machine names: what Docker allows for container names. No '/', no '..'.
NAME_PATTERN = r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$"
AGENT_PORT_NAME = "ember.agent"


@dataclass(frozen=True)
class DriveSpec:
    """A virtio-blk disk. The first drive is ``/dev/vda`` in the guest, and so on."""

    path: Path
    readonly: bool = True
    format: str = "raw"

    def __post_init__(self) -> None:
        if self.format not in ("raw", "qcow2"):
            raise VMMError(f"unsupported disk format {self.format!r}")


@dataclass(frozen=True)
class RestoreSpec:
    """What a machine restored from a snapshot (a clone) starts from, instead of a boot.

    ``memory`` is mapped privately (copy-on-write: the clone's writes are its own
    and never reach the file, which many clones share); ``state`` is QEMU's
    device state, loaded at start. See ``vmm/snapshot.py``.

    ``copy``: instead, the memory is copied into a memfd of the clone's own, as a
    booted machine has: it shares nothing, and can itself be snapshotted as fast
    as a booted machine (a daemon's warm starts).
    """

    snapshot_id: str
    memory: Path
    state: Path
    copy: bool = False
    #: The snapshot's copy of its machine's root layer (a user snapshot of a machine
    #: with one): the clone's layer starts as a copy of it.
    layer: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"snapshot_id": self.snapshot_id, "memory": str(self.memory),
                "state": str(self.state), "copy": self.copy,
                "layer": str(self.layer) if self.layer else None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RestoreSpec:
        return cls(str(d["snapshot_id"]), Path(d["memory"]), Path(d["state"]),
                   bool(d.get("copy", False)), Path(d["layer"]) if d.get("layer") else None)


@dataclass(frozen=True)
class MachineSpec:
    """A microVM: kernel, initramfs, command line, CPUs, memory, disks, where it lives."""

    name: str
    state_dir: Path
    kernel: Path
    initramfs: Path
    cmdline: str
    cpus: int = 1
    memory_mib: int = 256
    accel: str = "tcg"
    drives: tuple[DriveSpec, ...] = field(default_factory=tuple)
    #: ``"user"`` (a virtio-net NIC on QEMU's user-mode NAT) or ``"none"`` (no NIC);
    #: see ``vmm/network.py``. The guest learns its addresses from the command line.
    network: str = NETWORK_NONE
    #: What carries the ``"user"`` network: ``"slirp"`` (QEMU's NAT) or ``"tap"`` (a
    #: namespace, tap and nftables of the machine's own, as root: ``vmm/netns.py``).
    net_backend: str = "slirp"
    #: Guest TCP ports published on the host (``"user"`` network only).
    ports: tuple[PortMapping, ...] = field(default_factory=tuple)
    #: Where the guest may connect (``vmm/egress.py``; the tap network only); None:
    #: the default network's rule, public addresses only.
    egress: EgressPolicy | None = None
    #: Named volumes, LUN N of the SCSI controller being volume N (``volumes/store.py``):
    #: QEMU holds each one's lock while it runs.
    volumes: tuple[VolumeMount, ...] = field(default_factory=tuple)
    #: Host directories shared over 9p, entry N of the export being share N
    #: (``volumes/shares.py``).
    shares: tuple[ShareMount, ...] = field(default_factory=tuple)
    #: The writable root layer on disk (``volumes/layer.py``), the disk after the
    #: image; None: guest memory.
    layer: RootLayer | None = None
    #: Confine QEMU to a cgroup holding it to ``cpus`` CPUs and ``memory_mib`` plus
    #: QEMU's overhead (``host/cgroup.py``), where the host allows.
    limit_resources: bool = False
    #: Start from a snapshot instead of booting (a clone); None: boot.
    restore: RestoreSpec | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.cpus <= MAX_CPUS:
            raise VMMError(f"cpus must be between 1 and {MAX_CPUS}, not {self.cpus}")
        if not MIN_MEMORY_MIB <= self.memory_mib <= MAX_MEMORY_MIB:
            raise VMMError(f"memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, "
                           f"not {self.memory_mib}")
        if self.net_backend not in NET_BACKENDS:
            raise VMMError(f"network backend must be {' or '.join(NET_BACKENDS)}, "
                           f"not {self.net_backend!r}")
        if self.accel not in ("kvm", "tcg"):
            raise VMMError(f"accelerator must be kvm or tcg, not {self.accel!r}")
        if self.egress is not None and not (self.network == NETWORK_USER
                                            and self.net_backend == BACKEND_TAP):
            raise VMMError("egress policies need the tap network (root's default); this "
                           f"machine's network is {self.network}"
                           + (f" on {self.net_backend}" if self.network == NETWORK_USER else ""))
        try:
            check_network(self.network, self.ports)
        except EmberError as exc:
            raise VMMError(str(exc)) from None

    # Paths in the state directory. QEMU runs with the state directory as its
    # working directory and is given these names relative to it: a Unix socket
    # path is limited to 107 bytes and state directories can be deeper than that.
    # QEMU's sockets are in ``vmm/``, the only directory a jailed QEMU may write
    # (``host/jail.py``).
    QMP_SOCKET = "vmm/qmp.sock"
    AGENT_SOCKET = "vmm/agent.sock"
    CONSOLE_LOG = "console.log"
    CONSOLE_SOCKET = "vmm/console.sock"
    QEMU_LOG = "qemu.log"
    MEMORY_FILE = "memory"
    #: The number of the descriptor through which QEMU holds a booted machine's
    #: memory (a memfd): ``/proc/QEMU/fd/N`` is the guest's RAM (``vmm/snapshot.py``).
    MEMORY_FD_FILE = "memory.fd"
    PID_FILE = "qemu.pid"
    SPEC_FILE = "spec.json"

    def path(self, name: str) -> Path:
        return self.state_dir / name

    def root_mounts(self) -> dict[str, str]:
        """What the agent mounts as the root (IDENTITY's ``rw``, ``volumes``, ``shares``;
        ``guest/agent_src/mounts.c``): the writable layer, the volumes, the shares."""
        from ember.volumes.shares import cmdline_param as shares_param
        from ember.volumes.store import cmdline_param as volumes_param

        # the layer is the disk after the image's (vmm/qemu.py): vdb
        return {"rw": "/dev/vdb" if self.layer is not None else "tmpfs",
                "volumes": volumes_param(self.volumes).removeprefix("ember.volumes="),
                "shares": shares_param(self.shares).removeprefix("ember.shares=")}

    @property
    def mounts_host_data(self) -> bool:
        """Volumes or shares: never snapshotted nor restored (``MachineConfig``'s)."""
        return bool(self.volumes or self.shares)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state_dir"] = str(self.state_dir)
        d["kernel"] = str(self.kernel)
        d["initramfs"] = str(self.initramfs)
        d["drives"] = [{**asdict(x), "path": str(x.path)} for x in self.drives]
        d["ports"] = [asdict(x) for x in self.ports]
        d["restore"] = self.restore.to_json() if self.restore else None
        d["egress"] = self.egress.to_json() if self.egress else None
        d["volumes"] = [v.to_json() for v in self.volumes]
        d["shares"] = [m.to_json() for m in self.shares]
        d["layer"] = self.layer.to_json() if self.layer else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MachineSpec:
        try:
            return cls(
                name=d["name"], state_dir=Path(d["state_dir"]), kernel=Path(d["kernel"]),
                initramfs=Path(d["initramfs"]), cmdline=d["cmdline"], cpus=int(d["cpus"]),
                memory_mib=int(d["memory_mib"]), accel=d["accel"],
                drives=tuple(DriveSpec(Path(x["path"]), bool(x["readonly"]), x["format"])
                             for x in d["drives"]),
                # spec.json files written before networking existed have neither key
                network=d.get("network", NETWORK_NONE),
                net_backend=d.get("net_backend", "slirp"),
                ports=tuple(PortMapping(int(x["host_port"]), int(x["guest_port"]),
                                        x["host_ip"], x.get("protocol", "tcp"))
                            for x in d.get("ports", ())),
                limit_resources=bool(d.get("limit_resources", False)),
                egress=EgressPolicy.from_json(d.get("egress")),
                volumes=tuple(VolumeMount.from_json(v) for v in d.get("volumes") or ()),
                shares=tuple(ShareMount.from_json(m) for m in d.get("shares") or ()),
                layer=RootLayer.from_json(d.get("layer")),
                restore=RestoreSpec.from_json(d["restore"]) if d.get("restore") else None,
            )
        except (EmberError, KeyError, TypeError, ValueError) as exc:
            raise VMMError(f"invalid machine spec: {exc}") from exc

    def save(self) -> None:
        self.path(self.SPEC_FILE).write_text(json.dumps(self.to_json(), indent=2))
