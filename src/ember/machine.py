"""A microVM's lifecycle: the state machine that ties VMM, guest and agent together.

    CREATED ──start()──▶ BOOTING ──READY──▶ RUNNING ──shutdown()──▶ STOPPING ──▶ STOPPED
                            │                  │                                  ▲
                            └──── QEMU dies ───┴──────────▶ CRASHED      kill() ──┘

Every public method is guarded by the states it is valid in and raises
``StateError`` otherwise (the pattern of qemu.qmp's ``@require``).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
import re
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

from ember.errors import (
    AgentDisconnected,
    AgentError,
    EmberError,
    MachineCrashed,
    ProtocolError,
    VMMError,
)
from ember.guest.bundle import GuestBundle
from ember.host.probe import AccelChoice
from ember.util import log
from ember.vmm.egress import EgressPolicy
from ember.vmm.network import (
    BACKEND_SLIRP,
    NETWORK_USER,
    PortMapping,
    check_network,
    default_backend,
    guest_cmdline_param,
)
from ember.vmm.process import VMProcess, is_running_in
from ember.vmm.qemu import APIC_BUS_HZ
from ember.vmm.spec import AGENT_PORT_NAME, DriveSpec, MachineSpec, RestoreSpec
from ember.volumes.layer import RootLayer
from ember.volumes.shares import ShareMount
from ember.volumes.store import VolumeMount, check_mounts

if TYPE_CHECKING:
    from ember.agent.client import AgentClient, Process
    from ember.agent.protocol import ExecRequest, ExitStatus, ReadyInfo
    from ember.snapshots.plan import Speculative
    from ember.vmm.resolver import Served

P = ParamSpec("P")
R = TypeVar("R")

#: Guest kernel command line. ``reboot=t``: a reboot triple-faults, which QEMU's
#: ``-no-reboot`` turns into exit (our power-off). ``panic=-1``: reboot at once on
#: a panic, so a broken guest ends instead of hanging. Not ``quiet``: the kernel's
#: boot messages (about 7 KB) are what ``ember logs --console`` and the error of a
#: failed boot show, and measured under TCG they cost no boot time we could see
#: (docs/benchmarks.md).
BASE_CMDLINE = "console=ttyS0 reboot=t panic=-1"

#: Seconds of boot after which a caller's progress hears what the boot waits for.
SLOW_BOOT = 5.0


def guest_cmdline(guest: GuestBundle, extra: str = "", *, accel: str = "tcg") -> str:
    """The kernel command line for ``guest``: the base, the timer hint, ``extra``.

    ``lapic_timer_period`` (local APIC timer bus clocks per jiffy) is a parameter
    our kernel patch adds (guest/kernel-patches/0001-...): stating it skips a
    calibration that takes 200 ms of a software-CPU boot.
    """
    parts = [BASE_CMDLINE]
    if guest.kernel_hz:
        parts.append(f"lapic_timer_period={APIC_BUS_HZ // guest.kernel_hz}")
    if accel == "tcg" and guest.tsc_khz:
        # the guest's TSC is the host's: no calibration, no watchdog (host/tsc.py)
        parts.append(f"tsc_early_khz={guest.tsc_khz} tsc=reliable")
    if extra:
        parts.append(extra)
    return " ".join(parts)


class MachineState(enum.Enum):
    CREATED = "created"
    BOOTING = "booting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"


class StateError(EmberError):
    """An action was asked of a machine in a state that does not allow it."""


def require(*states: MachineState) -> Callable[
        [Callable[Concatenate[Machine, P], R]], Callable[Concatenate[Machine, P], R]]:
    def decorate(fn: Callable[Concatenate[Machine, P], R]) -> Callable[Concatenate[Machine, P], R]:
        @functools.wraps(fn)
        def guarded(self: Machine, *args: P.args, **kwargs: P.kwargs) -> R:
            if self.state not in states:
                allowed = " or ".join(s.value for s in states)
                raise StateError(f"machine {self.name} is {self.state.value}, "
                                 f"{fn.__name__} needs it {allowed}")
            return fn(self, *args, **kwargs)
        return guarded  # type: ignore[return-value]
    return decorate


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,61}[A-Za-z0-9])?")


def new_machine_id() -> str:
    return secrets.token_hex(6)


@dataclass(frozen=True)
class MachineConfig:
    """The hardware of a machine, as a user states it."""

    cpus: int = 1
    memory_mib: int = 256
    #: The guest's hostname; default: the machine's name (as Docker uses the container id).
    hostname: str | None = None
    #: Lives only as long as this process (``ember run``): QEMU dies with it, and a
    #: state directory left by a killed ``ember run`` is reaped by the next one.
    ephemeral: bool = False
    #: ``"user"``: a NIC on QEMU's rootless NAT (outbound access; the host's loopback
    #: is reachable at 10.0.2.2); ``"none"``: no NIC, only ``lo``. See ``vmm/network.py``.
    network: str = NETWORK_USER
    #: Guest TCP ports published on the host (``parse_port`` reads ``-p`` values).
    ports: tuple[PortMapping, ...] = ()
    #: Confine QEMU to ``cpus`` CPUs and the guest's memory plus overhead in a
    #: cgroup of its own, where the host allows it (``host/cgroup.py``).
    limit_resources: bool = False
    #: Where the guest may connect (``vmm/egress.py``); None: public addresses only.
    #: Needs the tap network (root).
    egress: EgressPolicy | None = None
    #: Named volumes to mount (``volumes/store.py``): disks after the root, mounted by
    #: the agent. Such a machine never starts from, nor makes, a snapshot.
    volumes: tuple[VolumeMount, ...] = ()
    #: Host directories shared live (``volumes/shares.py``); no snapshots either.
    shares: tuple[ShareMount, ...] = ()
    #: The writable root layer on disk (``volumes/layer.py``); None: guest memory.
    layer: RootLayer | None = None

    @property
    def mounts_host_data(self) -> bool:
        """Whether it has volumes or shares: it never starts from, nor makes, a snapshot
        (the guest kernel's view of them would not survive a restore)."""
        return bool(self.volumes or self.shares)

    def __post_init__(self) -> None:
        # The hostname travels on the kernel command line: anything beyond a
        # plain DNS name could smuggle in other parameters.
        if self.hostname is not None and not _HOSTNAME_RE.fullmatch(self.hostname):
            raise EmberError(f"invalid hostname {self.hostname!r}: use letters, digits, '-' "
                             "and '.', at most 63 characters")
        if not isinstance(self.ports, tuple):  # a list from a caller: keep the record frozen
            object.__setattr__(self, "ports", tuple(self.ports))
        check_network(self.network, self.ports)
        for name in ("volumes", "shares"):
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_mounts(self.volumes, self.shares)


class Machine:
    """One microVM: its QEMU process and its agent connection."""

    #: Marks the state directory of an ephemeral machine.
    EPHEMERAL_MARK = "ephemeral"
    #: The egress policy last set on the running machine (``set_egress``).
    EGRESS_FILE = "egress.json"

    def __init__(self, spec: MachineSpec, *, ephemeral: bool = False,
                 hostname: str | None = None) -> None:
        self.spec = spec
        self.ephemeral = ephemeral
        #: Ember's resolver for this guest, when its egress policy names domains.
        self._dns: Served | None = None
        #: What a clone is renamed to by the identity refresh (a boot has it from the
        #: command line): the configured hostname, else the machine's name.
        self.hostname = hostname or spec.name
        self.state = MachineState.CREATED
        self.vm: VMProcess | None = None
        self.agent: AgentClient | None = None
        self.ready: ReadyInfo | None = None
        #: The guest's root is mounted (False between a boot's READY and the IDENTITY
        #: that mounts it: a boot snapshot is taken then).
        self.root_mounted = False

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def create(cls, *, machines_dir: Path, guest: GuestBundle, rootfs: Path,
               accel: AccelChoice, config: MachineConfig = MachineConfig(),
               name: str | None = None, restore: RestoreSpec | None = None) -> Machine:
        """A machine booting ``rootfs`` (read-only, with a writable overlay in guest memory).

        With ``restore`` it starts from that snapshot instead of booting (a clone):
        everything else must be what the snapshot was taken with (the snapshot
        store checks), except the name, hostname and published ports.
        """
        name = name or new_machine_id()
        if config.mounts_host_data and restore is not None:
            raise EmberError("a machine with volumes or shares cannot start from a snapshot: "
                             "its guest would hold another disk's filesystem state")
        net = guest_cmdline_param(config.network)
        # ember.late=1: the agent mounts the root when the host says how (root_mounts):
        # a boot snapshot is taken before, so its clones mount their own disks
        cmdline = guest_cmdline(
            guest, f"ember.root=/dev/vda ember.rootfstype=erofs ember.late=1 "
            f"ember.hostname={config.hostname or name} "
            f"ember.port={AGENT_PORT_NAME}" + (f" {net}" if net else ""), accel=accel.name)
        spec = MachineSpec(
            name=name, state_dir=machines_dir / name, kernel=guest.kernel,
            initramfs=guest.initramfs, cmdline=cmdline, cpus=config.cpus,
            memory_mib=config.memory_mib, accel=accel.name,
            drives=(DriveSpec(rootfs, readonly=True),),
            volumes=config.volumes, shares=config.shares, layer=config.layer,
            network=config.network, ports=config.ports, egress=config.egress,
            net_backend=default_backend() if config.network == NETWORK_USER else BACKEND_SLIRP,
            limit_resources=config.limit_resources, restore=restore,
        )
        return cls(spec, ephemeral=config.ephemeral, hostname=config.hostname)

    @classmethod
    def adopt(cls, state_dir: Path, *, hello_timeout: float = 10.0,
              connect_agent: bool = True) -> Machine:
        """Take over a machine that an earlier process (a daemon since restarted) started.

        Reads ``spec.json``, checks that its QEMU still runs, listens for its
        console again and reconnects to its agent (a new HELLO; the agent keeps
        its processes). ``connect_agent=False`` is for a paused machine, whose
        agent cannot answer until it is resumed (then call :meth:`reconnect`).

        Raises:
            VMMError: no spec, or QEMU is gone.
            MachineCrashed: the agent does not answer (QEMU is then killed).
        """
        import json

        try:
            spec = MachineSpec.from_json(json.loads((state_dir / MachineSpec.SPEC_FILE)
                                                    .read_text()))
        except (OSError, ValueError) as exc:
            raise VMMError(f"cannot read the spec of {state_dir}: {exc}") from exc
        m = cls(spec)
        m.vm = VMProcess.adopt(spec)
        m.state = MachineState.RUNNING
        m._serve_dns()
        if connect_agent:
            m.reconnect(hello_timeout)
        return m

    def reconnect(self, hello_timeout: float = 10.0) -> ReadyInfo:
        """Connect to the agent of a running machine again (after :meth:`adopt`)."""
        assert self.vm is not None
        from ember.agent.client import AgentClient

        if self.agent is not None:
            self.agent.close()
        try:
            sock = self.vm.connect(MachineSpec.AGENT_SOCKET, timeout=5.0)
            # Channel ids far from those an earlier session may have left running.
            self.agent = AgentClient(sock, first_channel=secrets.randbelow(1 << 30) + (1 << 30))
            # Resent: the guest's port sees the host connect again only after a moment,
            # and a READY written before that is dropped (seen once in a full CI run:
            # a warm-started machine's first HELLO after the daemon restarted was lost).
            self.ready = self.agent.hello(timeout=hello_timeout, resend=0.25)
            if self.ready.root_pending:  # its starter died between READY and the root
                self.agent.identity(hostname=None, root=self.spec.root_mounts())
                self.ready = dataclasses.replace(self.ready, root_pending=False)
            self.root_mounted = True
        except AgentError as exc:
            raise self._give_up(f"the guest agent did not answer after re-adoption ({exc})") \
                from exc
        return self.ready

    def _give_up(self, why: str) -> MachineCrashed:
        """Mark the machine crashed, kill QEMU, and say why with the console's tail."""
        assert self.vm is not None
        self.state = MachineState.CRASHED
        tail = self.vm.console_tail()
        self.vm.kill()
        return MachineCrashed(f"machine {self.name}: {why}", tail)

    @require(MachineState.CREATED)
    def start(self, boot_timeout: float = 60.0,
              progress: Callable[[str], None] | None = None,
              speculative: Speculative | None = None,
              before_root: Callable[[], None] | None = None) -> ReadyInfo:
        """Start QEMU and wait for the agent's READY, then have it mount the root.

        ``before_root``: called between a boot's READY and the mounting of its root
        (its guest then has nothing of this machine's disks mounted): where a boot
        snapshot is taken.

        A boot still waiting after :data:`SLOW_BOOT` seconds is reported once to
        ``progress``, with what it waits for and the console's last line.

        Raises:
            MachineCrashed: QEMU exited during boot, or the guest did not answer within
                ``boot_timeout`` (then QEMU is killed); it carries the console's tail.
        """
        self.state = MachineState.BOOTING
        if speculative is not None:  # QEMU already started from a plan (snapshots/plan.py)
            assert speculative.vm.spec == self.spec
            self.vm = speculative.vm
        else:
            self.vm = VMProcess.start(self.spec, die_with_parent=self.ephemeral)
            if self.ephemeral:
                self.spec.path(self.EPHEMERAL_MARK).touch()
        self._serve_dns()  # before the guest can ask
        # Imported only now, while the guest boots on QEMU's thread: the agent
        # client's modules cost ~20 ms that need not delay QEMU's start.
        from ember.agent.client import AgentClient

        slow = threading.Timer(SLOW_BOOT, self._report_slow_boot, args=(progress,)) \
            if progress is not None else None
        if slow is not None:
            slow.daemon = True
            slow.start()
        try:
            if self.spec.restore is not None:
                self._restore(speculative)
            if speculative is not None and speculative.agent is not None:
                # restored, greeted and given its identity while Ember imported
                assert speculative.ready is not None and self.spec.restore is not None
                self.agent = speculative.agent
                self.ready = dataclasses.replace(speculative.ready,
                                                 restored_from=self.spec.restore.snapshot_id,
                                                 root_pending=False)
                self.root_mounted = True
                self.state = MachineState.RUNNING
                return self.ready
            sock = self.vm.connect(MachineSpec.AGENT_SOCKET, timeout=10.0)
            if self.spec.restore is None:
                self.agent = AgentClient(sock)
                ready = self.agent.hello(timeout=boot_timeout)
                if ready.root_pending:
                    if before_root is not None:
                        before_root()
                    self.agent.identity(hostname=None, root=self.spec.root_mounts())
                self.ready = dataclasses.replace(ready, root_pending=False)
            else:
                # A clone's channel ids keep clear of the snapshot's live processes,
                # and its first HELLO can be lost while the restored port comes up.
                self.agent = AgentClient(sock, first_channel=secrets.randbelow(1 << 30) + (1 << 30))
                ready = self.agent.hello(timeout=boot_timeout, resend=0.1)
                snap = self.spec.restore.snapshot_id
                self.agent.identity(hostname=self.hostname, snapshot=snap,
                                    root=self.spec.root_mounts() if ready.root_pending else None)
                self.ready = dataclasses.replace(ready, restored_from=snap, root_pending=False)
            self.root_mounted = True
        except AgentDisconnected as exc:
            self.state = MachineState.CRASHED
            raise self._crash_error() from exc
        except MachineCrashed:
            self.state = MachineState.CRASHED
            raise
        except ProtocolError as exc:  # a hostile or broken guest: never trusted again
            raise self._give_up(f"the guest broke the agent protocol ({exc})") from exc
        except AgentError as exc:
            hint = (" (this host's KVM may not run the guest kernel: try --accel tcg)"
                    if self.spec.accel == "kvm" else "")
            raise self._give_up(f"the guest agent did not answer within {boot_timeout:g} s"
                                f"{hint}") from exc
        finally:
            if slow is not None:
                slow.cancel()
        self.state = MachineState.RUNNING
        log.debug("machine %s ready: %s", self.name, self.ready)
        return self.ready

    def _restore(self, speculative: Speculative | None = None) -> None:
        """Load a clone's device state; QEMU runs it the moment it is loaded."""
        from ember.vmm import snapshot

        assert self.vm is not None and self.spec.restore is not None
        try:
            if speculative is not None:
                speculative.wait_restored()  # loading since QEMU started
            else:
                snapshot.restore(self.vm)
        except VMMError as exc:
            self.vm.check_alive()  # QEMU refused the state: its own words say why
            raise self._give_up(f"cannot restore snapshot {self.spec.restore.snapshot_id}: "
                                f"{exc}") from exc

    def _report_slow_boot(self, progress: Callable[[str], None]) -> None:
        if self.state is not MachineState.BOOTING or self.vm is None:
            return
        lines = self.vm.console_tail(1).strip().splitlines()
        seen = f"its console's last line: {lines[-1].strip()[:160]}" if lines \
            else "its console is still empty"
        progress(f"machine {self.name}: still waiting for the guest agent to answer after "
                 f"{SLOW_BOOT:g} s on {self.spec.accel} ({seen})")

    def _crash_error(self) -> MachineCrashed:
        assert self.vm is not None
        try:
            self.vm.wait(2.0)
        except subprocess.TimeoutExpired:
            tail = self.vm.console_tail()
            self.vm.kill()
            return MachineCrashed(f"machine {self.name}: the agent channel closed "
                                  "but QEMU is still running (killed it)", tail)
        return self.vm.crashed()

    @require(MachineState.RUNNING)
    def exec(self, req: ExecRequest, *, on_stdout: Callable[[bytes], None] | None = None,
             on_stderr: Callable[[bytes], None] | None = None) -> Process:
        """Start a process in the guest; its output goes to the callbacks."""
        assert self.agent is not None
        return self.agent.exec(req, on_stdout=on_stdout, on_stderr=on_stderr)

    def wait_process(self, proc: Process, timeout: float | None = None) -> ExitStatus:
        """Wait for ``proc``'s exit status, turning a lost channel into ``MachineCrashed``."""
        try:
            return proc.wait(timeout)
        except AgentDisconnected as exc:
            self.state = MachineState.CRASHED
            raise self._crash_error() from exc

    @require(MachineState.RUNNING, MachineState.BOOTING)
    def shutdown(self, timeout: float = 10.0) -> None:
        """Power the guest off through the agent; stop QEMU over QMP if that fails."""
        assert self.vm is not None
        self.state = MachineState.STOPPING
        try:
            if self.agent is not None:
                self.agent.shutdown()
            self.vm.wait(timeout)
        except (AgentError, subprocess.TimeoutExpired) as exc:
            log.debug("graceful shutdown of %s failed (%s): stopping QEMU", self.name, exc)
            self.vm.stop()
        self.state = MachineState.STOPPED

    def set_egress(self, policy: EgressPolicy | None) -> None:
        """Replace the running guest's egress policy at once (``vmm/egress.py``).

        The policy is kept in the state directory (``egress.json``), so a daemon
        that re-adopts the machine serves its DNS under it.

        Raises:
            EmberError: the machine is not on the tap network (``egress policies
                need ...``), or is not running.
        """
        import json

        from ember.vmm import netns

        netns.apply_policy(self._tap_slot(), self.spec.ports, policy)
        self.spec.path(self.EGRESS_FILE).write_text(
            json.dumps(policy.to_json() if policy else None) + "\n")
        self._serve_dns(policy)

    def egress(self) -> EgressPolicy | None:
        """The policy in force: the last :meth:`set_egress`, else the spec's."""
        import json

        try:
            data = json.loads(self.spec.path(self.EGRESS_FILE).read_text())
        except (OSError, ValueError):
            return self.spec.egress
        try:
            return EgressPolicy.from_json(data) if isinstance(data, dict) else None
        except EmberError:
            return self.spec.egress

    def _serve_dns(self, policy: EgressPolicy | None = None) -> None:
        """Answer the guest's DNS with Ember's resolver when its policy names domains."""
        from ember.vmm import resolver

        policy = self.egress() if policy is None else policy
        wanted = policy is not None and policy.domains
        if self._dns is not None and not wanted:
            resolver.hub().stop(self._dns)
            self._dns = None
        if not wanted or policy is None:
            return
        if self._dns is not None:
            self._dns.policy = policy
            return
        try:
            self._dns = resolver.hub().serve(self._tap_slot(), policy)
        except (EmberError, OSError) as exc:
            log.warning("machine %s: no resolver for its domain rules: %s", self.name, exc)

    def egress_denied(self) -> int | None:
        """Packets of new connections its firewall dropped so far; None off the tap network."""
        from ember.vmm import netns

        try:
            slot = self._tap_slot()
        except EmberError:
            return None
        try:
            return netns.denied(slot) + (self._dns.denied if self._dns is not None else 0)
        except VMMError as exc:
            log.debug("egress counter of %s: %s", self.name, exc)
            return None

    def _tap_slot(self) -> int:
        from ember.vmm.launch import read_record

        record = read_record(self.spec.state_dir)
        if not record.get("netns") or not isinstance(record.get("slot"), int):
            raise EmberError(f"egress policies need the tap network (root's default); machine "
                             f"{self.name} is on network {self.spec.network}"
                             + (f" ({self.spec.net_backend})"
                                if self.spec.network == NETWORK_USER else ""))
        if self.vm is None or self.vm.poll() is not None:
            raise EmberError(f"machine {self.name} is not running")
        slot: int = record["slot"]
        return slot

    def kill(self) -> None:
        """Stop QEMU at once (SIGKILL). Valid in any state."""
        if self.vm is not None and self.vm.poll() is None:
            self.vm.kill()
        if self.state is not MachineState.CRASHED:
            self.state = MachineState.STOPPED

    def close(self, remove_state: bool = True) -> None:
        """Close the agent, make sure QEMU is gone, and (by default) delete the state dir."""
        if self._dns is not None:
            from ember.vmm import resolver

            resolver.hub().stop(self._dns)
            self._dns = None
        if self.agent is not None:
            self.agent.close()
        if self.vm is not None:
            self.vm.close(remove_state=remove_state)
        if self.state not in (MachineState.STOPPED, MachineState.CRASHED):
            self.state = MachineState.STOPPED


def reap_stale_ephemeral(machines_dir: Path) -> list[str]:
    """Delete the state directories of ephemeral machines whose QEMU is gone.

    They are what an ``ember run`` killed by SIGKILL (or a power cut) leaves;
    its QEMU died with it (``PR_SET_PDEATHSIG``). Returns the names removed.
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(machines_dir))
    except FileNotFoundError:
        return removed
    for entry in entries:
        state = Path(entry.path)
        if not (state / Machine.EPHEMERAL_MARK).exists():
            continue
        try:
            pid = int((state / MachineSpec.PID_FILE).read_text())
        except (OSError, ValueError):
            pid = 0
        if pid and is_running_in(pid, state):
            continue
        shutil.rmtree(state, ignore_errors=True)
        removed.append(entry.name)
    return removed

