"""How one QEMU is launched: its command line wrapped in the jail this host allows.

``host/jail.py`` says what the jail is; this module applies it to one
``MachineSpec``: which files QEMU sees (kernel, initramfs, disks, a clone's
snapshot memory, its ``vmm/`` directory), which uid it runs as, and what
``STATE/jail.json`` records of it. A jailed QEMU is a child of bubblewrap, not of
Ember: ``Jailed`` stands for it, with QEMU's own pid, bubblewrap's exit status
(which is QEMU's) and the signals that reach both.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import VMMError
from ember.host import jail
from ember.vmm import console
from ember.vmm.qemu import build_command
from ember.vmm.spec import MachineSpec

#: What ``STATE/jail.json`` holds: the level, and the slot and uid of a full jail.
JAIL_FILE = "jail.json"


@dataclass
class Launch:
    """The argv and descriptors that start one QEMU, and the jail's resources."""

    argv: list[str]
    mode: str
    pass_fds: list[int] = field(default_factory=list)
    uid: int | None = None
    gid: int | None = None
    slot: jail.Slot | None = None
    #: Our end of bubblewrap's ``--info-fd`` pipe (None when not jailed).
    info_fd: int | None = None
    _info_w: int | None = None
    #: The tap and the host ports' sockets (QEMU holds them; ours are closed).
    net_fds: list[int] = field(default_factory=list)
    #: The machine has a namespace of its own (``vmm/netns.py``), named after its slot.
    netns: bool = False
    #: The locks of its volumes (QEMU holds them; ours are closed).
    volume_fds: list[int] = field(default_factory=list)
    #: The host's idmapped mounts of its shares, detached once QEMU runs
    #: (``host/idmap.py``); and the descriptor bubblewrap reads its mode filter from.
    share_mounts: list[Path] = field(default_factory=list)
    seccomp_fd: int | None = None
    #: The largest file QEMU writes (its RLIMIT_FSIZE): its largest disk, or its RAM
    #: (a migration stream that carries it).
    fsize: int = 0

    @property
    def jailed(self) -> bool:
        return self.info_fd is not None

    @classmethod
    def plan(cls, spec: MachineSpec, qemu: str, *, die_with_parent: bool,
             memory_fd: int | None) -> Launch:
        """Plan the launch of ``spec``, reserving a slot for a full jail.

        Raises:
            VMMError: no free slot, or the state directory cannot be prepared.
        """
        import shutil

        pol = jail.policy()
        if pol.mode in (jail.MODE_ROOTLESS, jail.MODE_SECCOMP):
            jail.warn_once(f"machines run with less confinement: {pol.reason}")
        tap = _uses_tap(spec)
        if tap and pol.mode != jail.MODE_FULL:
            raise VMMError(f"machine {spec.name} has a tap network, which needs the full jail "
                           f"(root); this host gives {pol.mode}: {pol.reason}")
        state = spec.state_dir.resolve()
        if spec.restore is not None and not spec.restore.copy:
            try:
                jail.allow_clones(Path(spec.restore.memory).resolve(),
                                  jailed_uid=pol.mode == jail.MODE_FULL)
            except OSError as exc:
                raise VMMError(f"snapshot {spec.restore.snapshot_id}: cannot open its "
                               f"memory to clones: {exc.strerror}") from exc
        if spec.shares and pol.mode not in (jail.MODE_FULL, jail.MODE_ROOTLESS):
            raise VMMError(f"machine {spec.name} has host shares, which need the jail's mount "
                           f"namespace (bubblewrap); this host gives {pol.mode}: {pol.reason}")
        _check_shares(spec)
        _ensure_layer(spec)
        volume_fds = _hold_volumes(spec)
        if pol.mode not in (jail.MODE_FULL, jail.MODE_ROOTLESS):
            jail.prepare_vmm_dir(state, None, None)
            cmd = build_command(spec, qemu, console_reconnect=not die_with_parent,
                                memory_fd=memory_fd, sandbox=pol.mode != jail.MODE_OFF)
            launch = cls(cmd, pol.mode, list(volume_fds), volume_fds=volume_fds)
            launch._record(spec)
            return launch
        full = pol.mode == jail.MODE_FULL
        readonly = [Path(spec.kernel).resolve(), Path(spec.initramfs).resolve()]
        writable = [state / jail.VMM_DIR]
        for d in spec.drives:
            (readonly if d.readonly else writable).append(Path(d.path).resolve())
        for v in spec.volumes:
            (readonly if v.readonly else writable).append(Path(v.path).resolve())
        if spec.layer is not None:
            writable.append(spec.layer.path.resolve())
        groups: list[int] = []
        if spec.restore is not None and not spec.restore.copy:
            writable.append(Path(spec.restore.memory).resolve())
            if full:
                groups.append(jail.CLONE_GID)
        devices = ["/dev/kvm"] if spec.accel == "kvm" else []
        try:
            slot = jail.reserve_slot(str(state)) if full else None
        except BaseException:
            for fd in volume_fds:
                os.close(fd)
            raise
        uid = gid = slot.uid if slot is not None else None
        if full and spec.accel == "kvm":
            kvm = jail.kvm_gid()
            if kvm is not None:
                groups.append(kvm)
        net_fds: list[int] = []
        share_mounts: list[Path] = []
        try:
            jail.prepare_vmm_dir(state, uid, gid)
            for v in spec.volumes:  # its disk is this machine's alone while it runs
                jail.give(v.path, uid, gid)
            if spec.layer is not None:
                jail.give(spec.layer.path, uid, gid)
            if spec.shares and slot is not None:
                from ember.host import idmap

                assert uid is not None and gid is not None
                share_mounts = idmap.attach(slot.number, spec.shares, uid, gid)
            if tap:
                from ember.vmm import netns

                assert slot is not None
                netns.sweep()
                tap_fd, port_fds = netns.setup(slot.number, spec.ports, spec.egress)
                net_fds = [tap_fd, *port_fds]
        except BaseException as exc:
            if share_mounts:
                from ember.host import idmap

                idmap.detach(share_mounts)
            if slot is not None:
                slot.close()
            for fd in volume_fds:
                os.close(fd)
            if isinstance(exc, OSError):
                raise VMMError(f"cannot prepare {state / jail.VMM_DIR}: {exc.strerror}") from exc
            raise
        cmd = build_command(spec, qemu, console_reconnect=not die_with_parent,
                            memory_fd=memory_fd, sandbox=True,
                            tap_fd=net_fds[0] if net_fds else None)
        from ember.host import modefilter
        from ember.volumes.shares import SHARES_ROOT

        sources = share_mounts or [m.source for m in spec.shares]
        shares = tuple((src, f"{SHARES_ROOT}/{i}", m.readonly)
                       for i, (src, m) in enumerate(zip(sources, spec.shares, strict=True)))
        seccomp_fd = modefilter.program_fd() if modefilter.supported() else None
        r, w = os.pipe2(os.O_CLOEXEC)
        argv = jail.bwrap_args(
            jail.Mounts(tuple(readonly), tuple(writable), tuple(devices), chdir=state,
                        shares=shares),
            bwrap=shutil.which("bwrap") or "bwrap", share_net=_uses_slirp(spec),
            userns=not full, info_fd=w, die_with_parent=die_with_parent,
            seccomp_fd=seccomp_fd)
        if full:
            assert uid is not None and gid is not None
            argv += ["--", *jail.setpriv_args(uid, gid, tuple(groups),
                                               setpriv=shutil.which("setpriv") or "setpriv")]
        else:
            argv.append("--")
        pass_fds = ([w, *net_fds, *volume_fds] + ([slot.fd] if slot is not None else [])
                    + ([seccomp_fd] if seccomp_fd is not None else []))
        launch = cls(argv + cmd, pol.mode, pass_fds, uid, gid, slot, r, w, net_fds, tap,
                     volume_fds, share_mounts, seccomp_fd, _largest_write(spec))
        launch._record(spec)
        return launch

    def _record(self, spec: MachineSpec) -> None:
        record: dict[str, Any] = {"mode": self.mode}
        if self.slot is not None:
            record.update(slot=self.slot.number, uid=self.uid, gid=self.gid, netns=self.netns)
        spec.path(JAIL_FILE).write_text(json.dumps(record) + "\n")

    def child_pid(self, popen: subprocess.Popen[bytes], spec: MachineSpec) -> int:
        """QEMU's host pid, as bubblewrap reports it once it has started it.

        Raises:
            VMMError: bubblewrap failed (its message, from ``qemu.log``, is in the error).
        """
        assert self.info_fd is not None
        if self._info_w is not None:  # only bubblewrap may hold the write end now
            os.close(self._info_w)
            self._info_w = None
        try:
            pid = jail.read_child_pid(self.info_fd)
        except VMMError as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(5)
            why = console.tail(spec.path(spec.QEMU_LOG), 3).strip()
            raise VMMError(f"{exc}{': ' + why.splitlines()[-1] if why else ''}") from None
        self._detach_shares()  # QEMU runs: its jail has its own binds of them
        return pid

    def _detach_shares(self) -> None:
        if self.share_mounts:
            from ember.host import idmap

            idmap.detach(self.share_mounts)
            self.share_mounts = []

    def close(self) -> None:
        """Close Ember's copies of the descriptors QEMU inherited."""
        self._detach_shares()
        for fd in (self.info_fd, self._info_w, self.seccomp_fd):
            if fd is not None:
                os.close(fd)
        self.info_fd = self._info_w = self.seccomp_fd = None
        for fd in (*self.net_fds, *self.volume_fds):
            os.close(fd)
        self.net_fds, self.volume_fds = [], []
        if self.slot is not None:
            self.slot.close()

    def abandon(self) -> None:
        """QEMU did not start: close everything and remove its network."""
        slot = self.slot.number if self.slot is not None else None
        netns = self.netns
        self.close()
        if netns and slot is not None:
            release_network(slot)


def _hold_volumes(spec: MachineSpec) -> list[int]:
    """The locks of ``spec``'s volumes, taken (``volumes.store.hold``).

    Raises:
        VolumeInUse: another running machine has one; VolumeNotFound: one is gone.
    """
    from ember.volumes.store import hold

    fds: list[int] = []
    try:
        for v in spec.volumes:
            fds.append(hold(v))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _largest_write(spec: MachineSpec) -> int:
    sizes = [spec.memory_mib << 20]
    if spec.layer is not None:
        sizes.append(spec.layer.size)
    for v in spec.volumes:
        if not v.readonly:
            with contextlib.suppress(OSError):
                sizes.append(os.stat(v.path).st_size)
    return max(sizes) + (1 << 20)


def _ensure_layer(spec: MachineSpec) -> None:
    """The root layer, made at the machine's first start (a clone's: from its snapshot's)."""
    from ember.volumes.store import VolumeError

    if spec.layer is None:
        return
    try:
        spec.layer.ensure(spec.restore.layer if spec.restore is not None else None)
    except VolumeError as exc:
        raise VMMError(f"machine {spec.name}: {exc}") from None


def _check_shares(spec: MachineSpec) -> None:
    from ember.volumes.shares import ShareError, check_source

    for m in spec.shares:
        try:
            check_source(m)
        except ShareError as exc:
            raise VMMError(f"machine {spec.name}: {exc}") from None


def _uses_slirp(spec: MachineSpec) -> bool:
    """Whether QEMU itself needs the host's network (slirp); a tap is a descriptor."""
    from ember.vmm.network import NETWORK_USER

    return spec.network == NETWORK_USER and not _uses_tap(spec)


def _uses_tap(spec: MachineSpec) -> bool:
    from ember.vmm.network import BACKEND_TAP, NETWORK_USER

    return spec.network == NETWORK_USER and spec.net_backend == BACKEND_TAP


def release_network(slot: int) -> None:
    """Remove slot ``slot``'s network once no QEMU holds the slot (a reused slot is
    another machine's, and left alone)."""
    from ember.vmm import netns

    held = jail.hold_free_slot(slot)
    if held is None:
        return
    try:
        netns.teardown(slot, hold=held)  # in the background, holding the slot until done
    finally:
        os.close(held)


def release_jail(state_dir: Path) -> None:
    """What a machine's jail holds beyond QEMU's life: its network (if any)."""
    record = read_record(state_dir)
    if record.get("netns") and isinstance(record.get("slot"), int):
        release_network(record["slot"])


def read_record(state_dir: Path) -> dict[str, Any]:
    """``STATE/jail.json`` ({} for a machine started before the jail existed)."""
    try:
        data = json.loads((state_dir / JAIL_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def confinement(pid: int, state_dir: Path) -> dict[str, Any] | None:
    """A running QEMU's confinement: the jail level it was started with, and what
    the kernel reports of it (``host/jail.observe``); None once it is gone."""
    seen = jail.observe(pid)
    if seen is None:
        return None
    record = read_record(state_dir)
    out: dict[str, Any] = {"mode": record.get("mode", jail.MODE_OFF)}
    if "slot" in record:
        out["slot"] = record["slot"]
    return out | seen


class Jailed:
    """The parts of ``Popen`` that VMProcess uses, for QEMU started by bubblewrap.

    ``pid`` is QEMU's (the process whose memory and threads count); the status
    is bubblewrap's, which reports QEMU's exit code, or 128 + N when a signal N
    killed it: read back as ``-N``, as ``Popen`` would.
    """

    def __init__(self, popen: subprocess.Popen[bytes], pid: int) -> None:
        self._popen = popen
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self._gone = False

    @property
    def returncode(self) -> int | None:
        return _decode(self._popen.returncode)

    def poll(self) -> int | None:
        rc = self._popen.poll()
        if rc is not None:
            self._qemu_gone(0)
        return _decode(rc)

    def wait(self, timeout: float | None = None) -> int:
        rc = _decode(self._popen.wait(timeout))
        assert rc is not None
        self._qemu_gone(timeout)
        return rc

    def _qemu_gone(self, timeout: float | None) -> None:
        """Wait until QEMU has exited too (bubblewrap may be gone first when killed):
        its descriptors, the slot's lock among them, are closed by then."""
        import select

        # The descriptor stays open until this object goes: other threads may be
        # waiting on it too (a daemon's watcher while a request kills the machine).
        if not self._gone:
            self._gone = bool(select.select([self._pidfd], [], [],
                                            5.0 if timeout is None else timeout)[0])

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._pidfd)

    def kill(self) -> None:
        for pid in (self.pid, self._popen.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _decode(rc: int | None) -> int | None:
    if rc is not None and 128 < rc < 128 + signal.NSIG:
        return -(rc - 128)
    return rc
