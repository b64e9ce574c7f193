"""``ember run``: boot an image as a microVM, run one command, return its status.

The guest's stdout and stderr are written to the host's fds 1 and 2 as they
arrive (raw bytes, unmixed); the host's stdin is forwarded when it is not a
terminal, or with ``-i``; ``-t`` runs the command on a guest pseudo-terminal
with the host terminal in raw mode. The first SIGINT (Ctrl-C) or SIGTERM is
passed on to the guest command, as ``docker run`` passes signals on; a second
one stops the machine at once (SIGKILL of ``ember run`` takes QEMU with it).
Whatever happens, QEMU is gone and the machine's state directory deleted on
return. Unless ``--cold``, the machine starts as a clone of a boot snapshot of its
shape where one exists, and the first run of a shape keeps one
(``snapshots/start.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from ember import paths
from ember.errors import AgentError, EmberError
from ember.guest.bundle import ensure_guest
from ember.host.probe import AccelChoice, choose_accel, require_qemu
from ember.images import ImageStore, resolve_process
from ember.images.store import tag_moved_message
from ember.machine import Machine, MachineConfig, new_machine_id, reap_stale_ephemeral
from ember.util import Progress, log, stderr_progress

if TYPE_CHECKING:
    from ember.agent.client import Process
    from ember.agent.protocol import ExecRequest, ExitStatus
    from ember.images import Image, ProcessSpec
    from ember.snapshots.compat import HostIdentity
    from ember.snapshots.plan import Speculative
    from ember.snapshots.store import Snapshot
    from ember.snapshots.take import ImageInfo, Pending
    from ember.vmm.egress import EgressPolicy
    from ember.volumes.shares import ShareMount
    from ember.volumes.store import VolumeMount, VolumeRequest


@dataclass(frozen=True)
class RunRequest:
    image: str
    command: tuple[str, ...] | None = None
    entrypoint: str | None = None
    env: tuple[str, ...] = ()
    workdir: str | None = None
    user: str | None = None
    cpus: int = 1
    memory_mib: int = 256
    accel: str | None = None
    interactive: bool = False
    tty: bool = False
    hostname: str | None = None
    boot_timeout: float = 60.0
    network: str = "user"
    #: ``-p`` values as typed (``[IP:]HOST:GUEST`` or ``GUEST``)
    ports: tuple[str, ...] = ()
    #: The machine's name (its state directory, default hostname); default: generated.
    name: str | None = None
    #: Say everything (the accelerator's reason every time, not once per host).
    verbose: bool = False
    #: Boot, even where a boot snapshot of this machine shape would give a warm start.
    cold: bool = False
    #: Start as a clone of this user snapshot (id, id prefix or tag) instead of ``image``.
    from_snapshot: str | None = None
    #: Pull ``image`` from its registry: "missing" (not in the store), "always", "never".
    pull: str = "missing"
    #: Where the guest may connect (``--egress``, ``vmm/egress.py``); None: public
    #: addresses only. Needs the tap network (root).
    egress: EgressPolicy | None = None
    #: ``-v``: named volumes (``NAME:/PATH[:ro]``, ``volumes/store.py``) and host shares
    #: (``HOSTDIR:/PATH[:ro]``, ``volumes/shares.py``); such a machine cannot be snapshotted.
    volumes: tuple[VolumeRequest | ShareMount, ...] = ()
    #: A writable root layer on disk of this many bytes (``volumes/layer.py``), in the
    #: machine's state dir (gone with it at exit); None: guest memory.
    rootfs_size: int | None = None


@dataclass
class Prepared:
    """A machine ready to start, and how it will start."""

    machine: Machine
    #: The main process; None: follow the snapshot's own main process (``attach``).
    process: ProcessSpec | None
    accel: AccelChoice
    #: How it starts: "boot", "warm" (a clone of its shape's boot snapshot), or
    #: "snapshot" (``--from``).
    start: str = "boot"
    #: After a boot: the key under which to keep a boot snapshot (None: keep none).
    boot_key: str | None = None
    image: ImageInfo | None = None
    host: HostIdentity | None = None
    snapshot: Snapshot | None = None
    #: QEMU already started from a plan, whose spec is this machine's.
    speculative: Speculative | None = None


def prepare(req: RunRequest, progress: Progress, notice: Progress = stderr_progress,
            speculative: Speculative | None = None) -> Prepared:
    """Resolve the image (or snapshot), the guest bundle and the accelerator; create (not
    start) the machine, as a clone of its shape's boot snapshot where there is one.

    ``notice`` gets what the user should know even without progress lines: a tag the
    import of a path took from another image. ``speculative``: a QEMU started from a
    plan (``snapshots/plan.py``); used if its spec is the one made here, else killed.
    """
    try:
        prep = _prepare(req, progress, notice, speculative)
    except BaseException:
        if speculative is not None:
            speculative.discard()
        raise
    if speculative is not None and prep.speculative is not speculative:
        log.debug("machine %s was started ahead from a plan that no longer holds: discarded",
                  speculative.vm.spec.name)
        speculative.discard()
    elif speculative is not None:
        log.debug("machine %s was started ahead from its plan", speculative.vm.spec.name)
    return prep


def _prepare(req: RunRequest, progress: Progress, notice: Progress,
             speculative: Speculative | None) -> Prepared:
    require_qemu()
    from ember.host.resources import check_machine_shape
    from ember.vmm.network import check_network, check_ports_free, parse_port

    check_machine_shape(req.cpus, req.memory_mib)
    if req.name is not None:
        _check_name(req.name)
    ports = tuple(parse_port(p) for p in req.ports)
    check_network(req.network, ports)
    check_ports_free(ports)
    if req.egress is not None:
        _check_egress(req.network)
    volumes, shares = _volume_mounts(req)
    accel = choose_accel(req.accel)
    config = MachineConfig(cpus=req.cpus, memory_mib=req.memory_mib, hostname=req.hostname,
                           ephemeral=True, network=req.network, ports=ports,
                           egress=req.egress, volumes=volumes, shares=shares)
    if req.from_snapshot is not None:
        return _prepare_from_snapshot(req, accel, config)
    store = ImageStore(paths.images_dir())
    if os.path.exists(req.image) and not _looks_like_ref(req.image, store):
        imported = store.import_archive(Path(req.image), progress=progress)
        for move in imported.moved:
            notice(tag_moved_message(move))
        image = imported.image
    else:
        image = _resolve_or_pull(store, req, progress)
    process = resolve_process(
        image.config, command=list(req.command) if req.command else None,
        entrypoint=_entrypoint(req.entrypoint), env=req.env, workdir=req.workdir, user=req.user,
    )
    rootfs = store.rootfs(image, progress=progress)
    guest = ensure_guest(paths.cache_dir(), progress)
    _reap_and_check_name(req)
    name = req.name or (speculative.vm.spec.name if speculative is not None else None)
    if req.rootfs_size is not None:
        import dataclasses

        from ember.volumes.layer import LAYER_FILE, RootLayer

        name = name or new_machine_id()
        config = dataclasses.replace(config, layer=RootLayer(
            paths.machines_dir() / name / LAYER_FILE, req.rootfs_size))
    machine = Machine.create(machines_dir=paths.machines_dir(), guest=guest, rootfs=rootfs,
                             accel=accel, config=config, name=name)
    prepared = Prepared(machine, process, accel)
    if req.cold:
        return prepared
    from ember.snapshots import start as snapstart

    if snapstart.boot_cache_cap() <= 0:
        return prepared
    from ember.snapshots.compat import host_identity
    from ember.snapshots.take import ImageInfo, boot_key

    host = host_identity(accel.name, paths.cache_dir())
    key = boot_key(machine.spec, host)
    restore = snapstart.find_boot_snapshot(snapstart.boot_store(), key, machine.spec, host)
    if restore is not None:
        clone = snapstart.as_clone(machine, restore)
        used = speculative if speculative is not None and speculative.vm.spec == clone.spec \
            else None
        return Prepared(clone, process, accel, start="warm", speculative=used)
    prepared.boot_key = key
    prepared.host = host
    prepared.image = ImageInfo.of(image.id, req.image, image.config)
    return prepared


def _volume_mounts(req: RunRequest) -> tuple[tuple[VolumeMount, ...], tuple[ShareMount, ...]]:
    """``-v``: the volumes of this data dir, found (VolumeNotFound), and the shares,
    checked together. Whether another machine has a volume is for the start to say
    (VolumeInUse)."""
    if not req.volumes:
        return (), ()
    from ember.volumes.shares import ShareMount
    from ember.volumes.store import VolumeStore, check_mounts

    if req.from_snapshot is not None:
        raise EmberError("-v cannot be used with --from: a clone's memory would not match "
                         "the volumes' disks or the shares' files")
    store = VolumeStore(paths.volumes_dir())
    mounts = tuple(store.mount(v) for v in req.volumes if not isinstance(v, ShareMount))
    shares = tuple(v for v in req.volumes if isinstance(v, ShareMount))
    check_mounts(mounts, shares)
    return mounts, shares


def _check_egress(network: str) -> None:
    """An egress policy needs the tap network: said before an image is looked up (the
    machine's spec would refuse it too, later)."""
    from ember.vmm.network import BACKEND_TAP, NETWORK_USER, default_backend

    if network != NETWORK_USER:
        raise EmberError(f"egress policies need the tap network: with network {network} the "
                         "guest reaches nothing")
    if default_backend() != BACKEND_TAP:
        raise EmberError("egress policies need the tap network (root's default): this "
                         "machine would be on slirp, the rootless network (or "
                         "EMBER_NET_BACKEND=slirp, or no ip, nft or /dev/net/tun)")


def _resolve_or_pull(store: ImageStore, req: RunRequest, progress: Progress) -> Image:
    """The image ``req`` names, pulled from its registry first where ``req.pull`` says."""
    from ember.errors import ImageNotFound

    if req.pull != "always":
        try:
            return store.resolve(req.image)
        except ImageNotFound:
            if req.pull == "never":
                raise
    from ember.images.reference import looks_like_reference

    if not looks_like_reference(req.image):
        return store.resolve(req.image)
    from ember.images.registry.pull import describe, pull

    def say(event: dict[str, object]) -> None:
        line = describe(event)
        if line is not None:
            progress(line)

    return pull(store, req.image, on_event=say).imported.image


def _prepare_from_snapshot(req: RunRequest, accel: AccelChoice,
                           config: MachineConfig) -> Prepared:
    """``ember run --from SNAP [-- CMD]``: a clone of a user snapshot, in the foreground."""
    from ember.snapshots import start as snapstart
    from ember.snapshots.compat import host_identity
    from ember.snapshots.take import ImageInfo

    snap = snapstart.user_store().get(req.from_snapshot or "")
    m = snap.manifest
    # the snapshot's shape unless the user asked for one (then it must match)
    config = dataclasses.replace(
        config, cpus=m.cpus if req.cpus == 1 else req.cpus,
        memory_mib=m.memory_mib if req.memory_mib == 256 else req.memory_mib,
        network=m.network if req.network == "user" and not config.ports else req.network)
    info = ImageInfo(m.image_id, m.image_ref, m.image_config)
    process: ProcessSpec | None = None
    if req.command or req.entrypoint is not None or not m.main_channel:
        process = resolve_process(
            info.image_config(), command=list(req.command) if req.command else None,
            entrypoint=_entrypoint(req.entrypoint), env=req.env, workdir=req.workdir,
            user=req.user)
    elif req.env or req.workdir or req.user:
        raise EmberError("-e, -w and -u apply to a command: give one after -- (without one, "
                         "the clone follows the snapshot's own main process)")
    _reap_and_check_name(req)
    host = host_identity(accel.name, paths.cache_dir())
    machine = snapstart.machine_from_snapshot(
        snap, host, machines_dir=paths.machines_dir(), config=config,
        name=req.name or new_machine_id())
    return Prepared(machine, process, accel, start="snapshot", snapshot=snap, image=info)


def _reap_and_check_name(req: RunRequest) -> None:
    reap_stale_ephemeral(paths.machines_dir())
    if req.name is not None and (paths.machines_dir() / req.name).exists():
        raise EmberError(f"a machine named {req.name} is running (ember run --name): "
                         "choose another name")


def exec_request(req: RunRequest, process: ProcessSpec) -> ExecRequest:
    """The agent's EXEC for the main process (built once the guest boots; see Machine.start)."""
    from ember.agent.protocol import ExecRequest

    rows, cols = _terminal_size() if req.tty else (24, 80)
    try:
        return ExecRequest(
            argv=list(process.argv), env=list(process.env), cwd=process.cwd,
            user=process.user, tty=req.tty,
            stdin=req.interactive or req.tty or not sys.stdin.isatty(), rows=rows, cols=cols,
        )
    except ValueError as exc:
        raise EmberError(f"invalid command: {exc}") from None


def run(req: RunRequest, progress: Progress, notice: Progress = stderr_progress, *,
        plan_key: str | None = None, speculative: Speculative | None = None) -> int:
    """Run ``req`` to completion; return the guest command's exit code (128+N for signal N).

    ``plan_key``: the key of this run's plan (``snapshots/plan.py``): a warm start
    keeps one, a boot forgets it. ``speculative``: the QEMU started from it.
    """
    prep = prepare(req, progress, notice, speculative)
    if plan_key is not None and prep.speculative is None:
        from ember.snapshots import plan

        if prep.start == "warm":
            plan.save(paths.cache_dir(), plan_key, prep.machine.spec)
        else:
            plan.forget(paths.cache_dir(), plan_key)
    machine, accel = prep.machine, prep.accel
    why = f" ({accel.reason})" if req.verbose or _first_time(f"{accel.name}: {accel.reason}") \
        else ""
    how = {"boot": "", "warm": ", warm start (boot snapshot)",
           "snapshot": f", from snapshot {_snap_name(prep.snapshot)}"}[prep.start]
    spec = machine.spec
    progress(f"microVM {machine.name}: {spec.cpus} vCPU, {spec.memory_mib} MiB, "
             f"accelerator {accel.name}{why}{how}")
    committing: threading.Thread | None = None
    try:
        with _signals() as set_proc:
            def keep() -> None:  # before the root is mounted (Machine.start)
                nonlocal committing
                committing = _keep_boot_snapshot(prep)

            machine.start(boot_timeout=req.boot_timeout, progress=progress,
                          speculative=prep.speculative,
                          before_root=keep if prep.boot_key is not None else None)
            with _terminal_raw(req.tty):
                if prep.process is None:
                    proc = _follow_main(prep)
                    exec_stdin = False
                else:
                    exec_req = exec_request(req, prep.process)
                    exec_stdin = exec_req.stdin
                    proc = machine.exec(exec_req, on_stdout=_writer(1), on_stderr=_writer(2))
                set_proc(proc)
                if exec_stdin:
                    _forward_stdin(proc)
                status: ExitStatus = machine.wait_process(proc)
        # No guest shutdown: nothing of an `ember run` machine outlives it (its
        # root is read-only, its writable layer guest RAM), so QEMU is simply
        # killed below, which saves the guest's power-off path.
        return status.exit_code
    except KeyboardInterrupt:
        raise EmberError("interrupted: machine stopped") from None
    finally:
        if machine.spec.volumes:
            # a volume's ext4 must be unmounted cleanly (synced, journal closed): the
            # next machine may mount it read-only, which cannot replay a journal
            with contextlib.suppress(EmberError):
                machine.shutdown(timeout=10.0)
        machine.kill()
        machine.close(remove_state=True)
        if committing is not None:
            committing.join()


def _snap_name(snap: Snapshot | None) -> str:
    return (snap.manifest.tag or snap.manifest.short_id) if snap is not None else "?"


def _keep_boot_snapshot(prep: Prepared) -> threading.Thread | None:
    """Capture the freshly booted machine for later warm starts; commit on a thread.

    The guest is stopped only for the capture (tens of ms); hashing, syncing and
    the rename happen while the user's command runs. Any failure here costs the
    next run its warm start, never this run its result.
    """
    from ember.snapshots import start as snapstart
    from ember.snapshots.manifest import SnapshotError
    from ember.snapshots.take import begin

    assert prep.boot_key is not None and prep.image is not None and prep.host is not None
    store = snapstart.boot_store()
    try:
        pending = begin(prep.machine, store, prep.boot_key)
    except (SnapshotError, OSError) as exc:
        log.warning("no boot snapshot kept: %s", exc)
        return None

    def commit(pending: Pending = pending) -> None:
        assert prep.image is not None and prep.host is not None
        try:
            pending.commit(image=prep.image, host=prep.host, hostname=prep.machine.hostname,
                           boot_key=prep.boot_key or "")
            store.evict(snapstart.boot_cache_cap(), keep=prep.boot_key or "")
        except (EmberError, OSError) as exc:
            log.warning("no boot snapshot kept: %s", exc)

    t = threading.Thread(target=commit, name="boot-snapshot", daemon=True)
    t.start()
    return t


def _follow_main(prep: Prepared) -> Process:
    """A clone without a command: follow the snapshot's main process, still running in it."""
    from ember.agent.protocol import ExecRequest

    snap = prep.snapshot
    assert snap is not None and prep.machine.agent is not None and prep.machine.ready is not None
    live = prep.machine.ready.extra.get("channels")
    channel = snap.manifest.main_channel
    if isinstance(live, list) and channel not in live:
        raise EmberError(f"snapshot {_snap_name(snap)}: its main process had ended before the "
                         "snapshot; give a command after --")
    return prep.machine.agent.attach(channel, ExecRequest(argv=["(snapshot main process)"]),
                                     on_stdout=_writer(1), on_stderr=_writer(2))


def _entrypoint(value: str | None) -> list[str] | None:
    """``--entrypoint X`` replaces the image's; ``--entrypoint ''`` clears it (as in Docker)."""
    if value is None:
        return None
    return [value] if value else []


def _check_name(name: str) -> None:
    import re

    from ember.vmm.spec import NAME_PATTERN

    if not re.match(NAME_PATTERN, name):
        raise EmberError(f"invalid machine name {name!r}: letters, digits, '_', '.', '-', "
                         "at most 63 characters, starting with a letter or digit")


def _first_time(note: str) -> bool:
    """Whether ``note`` is new since this host booted (then it is remembered).

    The accelerator's reason (a paragraph on a PVM host) is said once, not on
    every run; ``-v`` says it always.
    """
    import hashlib

    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    key = hashlib.sha256(f"{boot}\n{note}".encode()).hexdigest()[:16]
    mark = paths.cache_dir() / "notes" / key
    if mark.exists():
        return False
    with contextlib.suppress(OSError):
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
    return True


def _looks_like_ref(value: str, store: ImageStore) -> bool:
    """A path that is also a known image reference is taken as the reference."""
    try:
        store.resolve(value)
        return True
    except EmberError:
        return False


def _writer(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except BrokenPipeError:
            pass
    return write


def _forward_stdin(proc: Process) -> None:
    """Copy the host's stdin to the process on a daemon thread; EOF closes its stdin."""
    def pump() -> None:
        try:
            while True:
                data = os.read(0, 65536)
                if not data:
                    break
                proc.write_stdin(data)
            proc.close_stdin()
        except (OSError, AgentError) as exc:
            log.debug("stdin forwarding ended: %s", exc)

    threading.Thread(target=pump, name="stdin", daemon=True).start()


@contextlib.contextmanager
def _signals() -> Iterator[Callable[[Process], None]]:
    """The first SIGINT or SIGTERM goes to the guest command; a second one stops everything.

    Yields the function that names the guest command once it runs.
    """
    current: list[Process] = []
    interrupted = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if current and not interrupted.is_set():
            interrupted.set()
            with contextlib.suppress(AgentError):
                current[0].signal(signum)
            return
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield current.append
        return
    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    old_winch = signal.getsignal(signal.SIGWINCH)

    def on_winch(signum: int, frame: FrameType | None) -> None:
        if current:
            rows, cols = _terminal_size()
            with contextlib.suppress(AgentError):
                current[0].resize(rows, cols)

    signal.signal(signal.SIGWINCH, on_winch)
    try:
        yield current.append
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGWINCH, old_winch)


def _terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(0)
    except OSError:
        return 24, 80
    # A pty nobody sized (script(1), some CI runners) reports 0x0.
    return size.lines or 24, size.columns or 80


@contextlib.contextmanager
def _terminal_raw(enabled: bool) -> Iterator[None]:
    if not enabled or not os.isatty(0):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)

