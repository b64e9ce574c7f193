"""Starting, supervising and stopping one QEMU process.

QEMU runs in its own session (so a Ctrl-C in the user's terminal reaches
Ember, which decides what to do, and not QEMU directly), with the machine's
state directory as its working directory. Sockets in that directory are
reached through ``/proc/self/fd/<dirfd>/NAME``: a short path whatever the
depth of the state directory (``sun_path`` holds at most 107 bytes).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from ember.errors import EmberError, HostError, MachineCrashed, VMMError
from ember.host import jail
from ember.host.cgroup import MachineCgroup
from ember.util import log
from ember.vmm import console
from ember.vmm.console import ConsoleRecorder
from ember.vmm.launch import Jailed, Launch, read_record, release_jail
from ember.vmm.qemu import TCG_TB_SIZE_MIB
from ember.vmm.spec import MachineSpec


class VMProcess:
    """A QEMU process running one ``MachineSpec``."""

    def __init__(self, spec: MachineSpec, popen: subprocess.Popen[bytes] | _Adopted | Jailed,
                 dir_fd: int, console: ConsoleRecorder,
                 cgroup: MachineCgroup | None = None, *, memory_fd: int | None = None,
                 incoming_fd: int | None = None) -> None:
        self.spec = spec
        self._popen = popen
        self._dir_fd = dir_fd
        self._console = console
        #: The cgroup confining QEMU (``spec.limit_resources`` on a host that allows it).
        self.cgroup = cgroup
        #: QEMU's descriptor of a booted machine's memory (a memfd); None for a clone.
        self.memory_fd = memory_fd
        #: A clone's: QEMU's descriptor of the device state it loads (``vmm/snapshot.py``).
        self.incoming_fd = incoming_fd

    @property
    def pid(self) -> int:
        return self._popen.pid

    @classmethod
    def start(cls, spec: MachineSpec, qemu: str = "qemu-system-x86_64", *,
              die_with_parent: bool = False) -> VMProcess:
        """Create the state directory, write the spec, start QEMU.

        With ``die_with_parent`` the kernel kills QEMU when this process dies, even
        by SIGKILL (``PR_SET_PDEATHSIG``): right for ``ember run``, whose machine
        lives only as long as the command; wrong for machines a daemon re-adopts.

        With ``spec.limit_resources`` QEMU runs in a cgroup of its own
        (``memory_limit_mib``, ``spec.cpus`` CPUs): the child enters it between fork
        and exec, so QEMU never runs, nor allocates, outside it. Where the host
        has no usable cgroups the machine runs unconfined (logged; ``ember
        doctor`` says why).

        Raises:
            VMMError: the state directory exists already, or QEMU cannot be started.
        """
        try:
            spec.state_dir.mkdir(parents=True, exist_ok=False, mode=0o700)
        except FileExistsError as exc:
            raise VMMError(f"machine state directory {spec.state_dir} exists already") from exc
        spec.save()
        try:
            inherited = _inherited_fds(spec)
        except VMMError:
            shutil.rmtree(spec.state_dir, ignore_errors=True)
            raise
        memory_fd = inherited[0] if spec.restore is None else (
            inherited[2] if spec.restore.copy else None)
        incoming_fd = inherited[0] if spec.restore is not None else None
        if spec.restore is not None:
            _seed_console(spec)
        dir_fd = os.open(spec.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            launch = Launch.plan(spec, qemu, die_with_parent=die_with_parent,
                                  memory_fd=memory_fd)
        except EmberError:  # VMMError, or PortUnavailable from a tap network's ports
            os.close(dir_fd)
            for fd in inherited:
                os.close(fd)
            shutil.rmtree(spec.state_dir, ignore_errors=True)
            raise
        log.debug("qemu: %s", " ".join(launch.argv))
        listener = console.listen(f"/proc/self/fd/{dir_fd}/{spec.CONSOLE_SOCKET}")
        jail.give(f"/proc/self/fd/{dir_fd}/{spec.CONSOLE_SOCKET}", launch.uid, launch.gid)
        cgroup = (MachineCgroup.create(cgroup_name(spec), spec.cpus, memory_limit_mib(spec))
                  if spec.limit_resources else None)
        procs_fds: list[int] = []
        try:
            procs_fds = cgroup.open_procs() if cgroup else []
            with open(spec.path(spec.QEMU_LOG), "wb") as qlog:
                popen = subprocess.Popen(
                    launch.argv, cwd=spec.state_dir, stdin=subprocess.DEVNULL, stdout=qlog,
                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                    pass_fds=[*inherited, *launch.pass_fds],
                    preexec_fn=jail.preexec(
                        _cgroup_join(procs_fds),
                        _die_with(os.getpid()) if die_with_parent else None,
                        jail.rlimits(launch.fsize) if launch.jailed else None),
                )
            proc: subprocess.Popen[bytes] | Jailed = popen
            if launch.info_fd is not None:
                proc = Jailed(popen, launch.child_pid(popen, spec))
        except (OSError, subprocess.SubprocessError, VMMError) as exc:
            listener.close()
            os.close(dir_fd)
            for fd in inherited:
                os.close(fd)
            launch.abandon()
            if cgroup is not None:
                with contextlib.suppress(HostError):
                    cgroup.remove()
            if isinstance(exc, VMMError):
                raise
            why = exc.strerror if isinstance(exc, OSError) else "could not enter its cgroup"
            raise VMMError(f"cannot start {qemu}: {why}") from exc
        finally:
            for fd in procs_fds:
                os.close(fd)
        for fd in inherited:  # QEMU holds its own copies now
            os.close(fd)
        launch.close()
        spec.path(spec.PID_FILE).write_text(f"{proc.pid}\n")
        if memory_fd is not None:
            spec.path(spec.MEMORY_FD_FILE).write_text(f"{memory_fd}\n")
        return cls(spec, proc, dir_fd,
                   console.ConsoleRecorder(listener, spec.path(spec.CONSOLE_LOG)), cgroup,
                   memory_fd=memory_fd, incoming_fd=incoming_fd)

    @classmethod
    def adopt(cls, spec: MachineSpec) -> VMProcess:
        """Take over the running QEMU of ``spec`` that an earlier process started.

        The console recorder listens again (QEMU, started with a reconnecting
        console, comes back within a second); the agent and QMP sockets are
        QEMU's own and are simply connected to again.

        Raises:
            VMMError: no live QEMU of this state directory.
        """
        try:
            pid = int(spec.path(spec.PID_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise VMMError(f"machine {spec.name}: no QEMU pid recorded") from exc
        if not is_running_in(pid, spec.state_dir):
            raise VMMError(f"machine {spec.name}: QEMU (pid {pid}) is not running")
        proc = _Adopted(pid)
        dir_fd = os.open(spec.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        name = f"/proc/self/fd/{dir_fd}/{spec.CONSOLE_SOCKET}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        listener = console.listen(name)
        record = read_record(spec.state_dir)
        jail.give(name, record.get("uid"), record.get("gid"))
        cgroup = MachineCgroup.find(cgroup_name(spec)) if spec.limit_resources else None
        memory_fd: int | None = None
        with contextlib.suppress(OSError, ValueError):
            memory_fd = int(spec.path(spec.MEMORY_FD_FILE).read_text())
        return cls(spec, proc, dir_fd,
                   console.ConsoleRecorder(listener, spec.path(spec.CONSOLE_LOG)), cgroup,
                   memory_fd=memory_fd)

    def socket_path(self, name: str) -> str:
        """A short path to a socket in the state directory, valid in this process."""
        return f"/proc/self/fd/{self._dir_fd}/{name}"

    def connect(self, name: str, timeout: float) -> socket.socket:
        """Connect to a Unix socket QEMU listens on, waiting for QEMU to create it.

        Raises:
            MachineCrashed: QEMU exited first.
            VMMError: the socket did not appear in time.
        """
        deadline = time.monotonic() + timeout
        path = self.socket_path(name)
        delay = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
            self.check_alive()
            if time.monotonic() > deadline:
                raise VMMError(f"QEMU did not open {name} within {timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.005)

    def poll(self) -> int | None:
        return self._popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for QEMU to exit; return its status. Raises ``subprocess.TimeoutExpired``.

        With a timeout, ``Popen.wait`` polls with sleeps of up to 50 ms; a pidfd
        (Linux 5.3+) wakes us the moment QEMU exits, which every ``ember run`` waits for.
        """
        if timeout is not None and self._popen.returncode is None:
            try:
                pidfd = os.pidfd_open(self._popen.pid)
            except (AttributeError, OSError):
                return self._popen.wait(timeout)
            try:
                if not select.select([pidfd], [], [], timeout)[0]:
                    raise subprocess.TimeoutExpired(self.spec.name, timeout)
            finally:
                os.close(pidfd)
        return self._popen.wait()

    def check_alive(self) -> None:
        """Raise ``MachineCrashed`` (with the console's last lines) if QEMU has exited."""
        rc = self._popen.poll()
        if rc is not None:
            raise self.crashed(rc)

    def crashed(self, rc: int | None = None) -> MachineCrashed:
        rc = self._popen.poll() if rc is None else rc
        qemu_err = console.tail(self.spec.path(self.spec.QEMU_LOG), 3).strip()
        if rc == 0:
            # -no-reboot turns any guest reboot (a panic with panic=-1, a
            # `reboot -f` by a root process) into a clean QEMU exit.
            msg = (f"machine {self.spec.name}: the guest rebooted or powered off on its own "
                   "(kernel panic, or a process called reboot)")
            return MachineCrashed(msg, console_tail=self.console_tail())
        how = f"signal {-rc}" if rc is not None and rc < 0 else f"status {rc}"
        msg = f"machine {self.spec.name}: QEMU exited unexpectedly ({how})"
        if qemu_err:
            msg += f": {qemu_err.splitlines()[-1]}"
        return MachineCrashed(msg, console_tail=self.console_tail())

    def console_tail(self, lines: int = 15) -> str:
        """The console's last lines; once QEMU has exited, everything it wrote."""
        if self._popen.poll() is not None:
            self._console.wait(2.0)
        return console.tail(self.spec.path(self.spec.CONSOLE_LOG), lines)

    def qmp(self) -> Any:
        """A connected QMP client (``vmm/qmp.py``). Imported lazily."""
        from ember.vmm.qmp import QMPClient

        return QMPClient.connect(self.socket_path(self.spec.QMP_SOCKET))

    def stop(self, timeout: float = 5.0) -> int:
        """Ask QEMU to quit over QMP; kill it if it does not exit within ``timeout``."""
        if self.poll() is not None:
            return self.wait()
        try:
            with self.qmp() as q:
                q.execute("quit")
        except Exception as exc:  # a wedged or dying QEMU: fall through to SIGKILL
            log.debug("qmp quit failed: %s", exc)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        """SIGKILL QEMU (and the jail holding it) and reap it."""
        if isinstance(self._popen, Jailed):
            self._popen.kill()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._popen.pid, signal.SIGKILL)
        return self.wait()

    def release(self) -> None:
        """Let go of a QEMU that must outlive this process (a daemon shutting down).

        Stops recording the console (QEMU reconnects to the next recorder) and
        closes the directory handle; QEMU itself is left running.
        """
        self._console.stop()
        self._console.wait(2.0)
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def close(self, remove_state: bool = False) -> None:
        """Release the directory handle and the cgroup; ``remove_state`` deletes the state dir.

        QEMU must have exited (this kills it if not): nothing may keep using the
        directory once it is gone.
        """
        if self.poll() is None:
            self.kill()
        release_jail(self.spec.state_dir)
        if self.cgroup is not None:
            try:
                self.cgroup.remove()
            except HostError as exc:
                log.warning("%s", exc)
        self._console.stop()
        self._console.wait(2.0)
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1
        if remove_state:
            shutil.rmtree(self.spec.state_dir, ignore_errors=True)

    def __enter__(self) -> VMProcess:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _seed_console(spec: MachineSpec) -> None:
    """A clone's console log starts with its snapshot's (the boot it came from)."""
    from ember.vmm.snapshot import CONSOLE_FILE

    assert spec.restore is not None
    with contextlib.suppress(OSError):
        kept = (spec.restore.state.parent / CONSOLE_FILE).read_bytes()
        spec.path(spec.CONSOLE_LOG).write_bytes(
            kept + f"[ember: restored from snapshot {spec.restore.snapshot_id[:12]}]\n".encode())


def _inherited_fds(spec: MachineSpec) -> list[int]:
    """The descriptors QEMU inherits: a booted machine's memory, or a clone's state and lock.

    A booted machine's RAM is a fresh memfd of the guest's size (sparse: pages
    are allocated as the guest touches them). A clone gets its snapshot's device
    state, and the snapshot's memory file open with a shared ``flock``: while
    any clone's QEMU lives the lock is held, which is how the snapshot store
    knows a snapshot is in use (``snapshots/store.py``), even after the process
    that started the clone is gone.

    Raises:
        VMMError: a snapshot file is missing or unreadable.
    """
    import fcntl

    if spec.restore is None:
        fd = os.memfd_create(f"ember-{spec.name}", os.MFD_CLOEXEC)
        os.ftruncate(fd, spec.memory_mib << 20)
        return [fd]
    fds: list[int] = []
    try:
        for path in (spec.restore.state, spec.restore.memory):
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        if spec.restore.copy:
            from ember.vmm.snapshot import copy_into_memfd

            fds.append(copy_into_memfd(fds[1], spec))
        else:
            fcntl.flock(fds[1], fcntl.LOCK_SH)
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        raise VMMError(f"snapshot {spec.restore.snapshot_id}: cannot open "
                       f"{exc.filename or 'its files'}: {exc.strerror}") from exc
    return fds


def cgroup_name(spec: MachineSpec) -> str:
    """The cgroup of a machine: its name plus a hash of its state directory.

    Names are unique within one data dir only; two data dirs (two users, a
    test session beside a daemon) may both have a machine called ``web``.
    """
    import hashlib

    digest = hashlib.sha256(str(spec.state_dir.resolve()).encode()).hexdigest()[:10]
    return f"{spec.name}-{digest}"


class _Adopted:
    """The parts of ``Popen`` that VMProcess uses, for a QEMU that is not our child.

    Its exit status cannot be known (only its parent can reap it): it reads as
    ``ADOPTED_EXIT`` once the process is gone. A pidfd keeps the pid from being
    mistaken for a recycled one.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._pidfd], [], [], 0)[0]:
            self._exited()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._pidfd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            self._exited()
        assert self.returncode is not None
        return self.returncode

    def _exited(self) -> None:
        # The pidfd stays open (other threads may be waiting on it) until we are collected.
        self.returncode = ADOPTED_EXIT

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._pidfd)


#: The status of an adopted QEMU that exited (its real status went to its parent).
ADOPTED_EXIT = 255


def memory_limit_mib(spec: MachineSpec) -> int:
    """The cgroup memory limit for ``spec``'s QEMU, MiB: guest RAM plus QEMU's own overhead.

    ``memory_mib + QEMU_BASE_OVERHEAD_MIB + memory_mib / 128``, plus
    ``TCG_TB_SIZE_MIB`` under TCG. Measured under TCG (docs/benchmarks.md): a
    guest that touched all its RAM leaves QEMU with about guest + 37 MiB of
    anonymous memory for both 256 MiB / 1 vCPU and 1 GiB / 2 vCPUs, of which
    ~25 MiB is translated code; guest + 32 MiB gets it OOM-killed, guest + 48
    MiB does not. The limit therefore allows the translation cache its full
    bound, the base covers QEMU's heap, its binary, libraries, kernel and
    initramfs pages (charged to whichever QEMU reads them first) and a little
    page cache; the per-GiB term covers page tables, which grow with the guest.
    The rest of the charge -- page cache of the memory file and of the disks --
    is clean and the kernel reclaims it at the limit instead of killing.
    """
    overhead = QEMU_BASE_OVERHEAD_MIB + spec.memory_mib // 128
    if spec.accel == "tcg":
        overhead += TCG_TB_SIZE_MIB
    return spec.memory_mib + overhead


#: QEMU's memory beyond guest RAM, page tables and the translation cache (see
#: ``memory_limit_mib``).
QEMU_BASE_OVERHEAD_MIB = 64


def _cgroup_join(cgroup_fds: list[int]) -> Callable[[], None] | None:
    """A ``preexec_fn`` step for QEMU: join its cgroup.

    ``cgroup_fds`` are open ``cgroup.procs`` files; writing "0" moves the
    writer, which is the child between fork and exec. A failed write raises,
    which ``Popen`` reports as a ``SubprocessError``: QEMU is never run unconfined.
    """
    if not cgroup_fds:
        return None

    def join() -> None:
        for fd in cgroup_fds:
            os.write(fd, b"0")
    return join


def _die_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get SIGKILL when ``parent`` exits."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def arm() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return arm


def kill_strays(state_dir: Path) -> list[int]:
    """SIGKILL every process working in ``state_dir`` (a QEMU nobody knows the pid of).

    A process killed between spawning QEMU and writing its pid file leaves one;
    the working directory still tells it apart. Its cgroup is removed too.
    Returns the pids killed.
    """
    import json

    target = str(state_dir.resolve())
    killed = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/cwd") != target:
                continue
            os.kill(int(entry.name), signal.SIGKILL)
            killed.append(int(entry.name))
        except OSError:
            continue
    for pid in killed:
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{pid}/cwd") and time.monotonic() < deadline:
            try:
                if os.readlink(f"/proc/{pid}/cwd") != target:
                    break
            except OSError:
                break
            time.sleep(0.01)
    release_jail(state_dir)
    try:
        spec = MachineSpec.from_json(json.loads((state_dir / MachineSpec.SPEC_FILE).read_text()))
    except (OSError, ValueError, VMMError):
        return killed
    if spec.limit_resources:
        cg = MachineCgroup.find(cgroup_name(spec))
        if cg is not None:
            with contextlib.suppress(HostError):
                cg.remove()
    return killed


def is_running_in(pid: int, state_dir: Path) -> bool:
    """Whether ``pid`` is a live QEMU of that state directory (not a recycled pid).

    QEMU runs with its state directory as working directory, which tells it apart.
    """
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(state_dir.resolve())
    except OSError:
        return False
