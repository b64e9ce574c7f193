"""Snapshots of a running QEMU, and clones started from them (QEMU 7.2 migration).

A booted machine's RAM is a memfd QEMU maps shared (``vmm/qemu.py``). With the
``x-ignore-shared`` capability, migration leaves shared RAM out of the stream,
so a snapshot is:

1. ``migrate`` to a descriptor passed over QMP (``getfd``): QEMU stops the
   guest at once (there is no RAM to send) and writes the device state, a few
   tens of KB;
2. while the guest is stopped, a sparse copy of its memory (only the pages it
   has touched: ``SEEK_DATA``/``SEEK_HOLE``) into the snapshot's memory file;
3. ``cont``: the machine goes on (unless it was paused before).

The memory must be copied while the guest is stopped: a copy of live memory
does not match the saved device state (docs/snapshots-research.md).

A clone is QEMU started with the snapshot's memory file mapped privately
(``share=off``: copy-on-write), ``-incoming defer`` and the state file as an
inherited descriptor; ``restore`` sets the capability, starts the incoming
migration and asks for ``cont``, which QEMU applies the moment the state is
loaded. A state QEMU cannot load makes it exit with an error (``qemu.log``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ember.errors import VMMError

if TYPE_CHECKING:
    from ember.vmm.process import VMProcess
    from ember.vmm.qmp import QMPClient
    from ember.vmm.spec import MachineSpec

_IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]

#: Names of a snapshot's QEMU files.
STATE_FILE = "state"
MEMORY_FILE = "memory"


@dataclass(frozen=True)
class Capture:
    """What a capture wrote, and how long the guest was stopped."""

    pause_s: float
    state_bytes: int
    #: Bytes of guest memory copied (the pages the guest had touched).
    memory_bytes: int
    memory_size: int


def capture(vm: VMProcess, dest: Path, *, timeout: float = 30.0,
            layer: bool = False) -> Capture:
    """Save ``vm``'s device state and memory into the directory ``dest``; the VM goes on.

    ``layer``: copy the machine's root layer on disk too (``rootfs.img``), while the
    guest is stopped, so that it matches the memory's file system state.

    ``dest`` must exist; ``state`` and ``memory`` are created in it (the caller
    renames the directory into place once everything is written).

    A clone that maps its snapshot privately has RAM QEMU does not share: the
    stream carries it (a longer pause, a state file the size of the touched RAM,
    and clones of the result share nothing); its ``memory`` file stays holes.

    Raises:
        VMMError: QEMU failed; the machine is resumed in any case if it was running.
    """
    from ember.vmm.qmp import QMPClient

    size = vm.spec.memory_mib << 20
    src: int | None = None
    if vm.memory_fd is not None:
        try:
            src = os.open(f"/proc/{vm.pid}/fd/{vm.memory_fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise VMMError(f"machine {vm.spec.name}: cannot open its memory: "
                           f"{exc.strerror}") from exc
    # else a clone mapping its snapshot privately: that RAM is not shared, so the
    # migration stream carries it (slower, and its clones share nothing), and the
    # memory file stays all holes
    try:
        with QMPClient.connect(vm.socket_path(vm.spec.QMP_SOCKET), timeout=timeout) as q:
            was_running = q.execute("query-status").get("status") == "running"
            q.execute("migrate-set-capabilities", capabilities=_IGNORE_SHARED)
            state_path = dest / STATE_FILE
            fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            t0 = time.monotonic()
            stopped = False
            try:
                _send_fd(q, "ember-snapshot", fd)
                q.execute("migrate", uri="fd:ember-snapshot")
                stopped = True
                _wait_migration(q, timeout, "snapshot")
                copied = _copy_memory(src, dest / MEMORY_FILE, size)
                if layer and vm.spec.layer is not None:
                    _copy_layer(vm.spec.layer.path, dest)
            finally:
                os.close(fd)
                if stopped and was_running:
                    q.execute("cont")
            pause = time.monotonic() - t0
    finally:
        if src is not None:
            os.close(src)
    _keep_console(vm, dest)
    return Capture(pause_s=pause, state_bytes=state_path.stat().st_size,
                   memory_bytes=copied, memory_size=size)


#: How much of the machine's console a snapshot keeps (its clones' console starts with it).
CONSOLE_KEEP = 64 << 10
CONSOLE_FILE = "console.log"


def _keep_console(vm: VMProcess, dest: Path) -> None:
    """Keep the console's last bytes (the boot's messages) for the clones' consoles."""
    with contextlib.suppress(OSError):
        data = vm.spec.path(vm.spec.CONSOLE_LOG).read_bytes()[-CONSOLE_KEEP:]
        fd = os.open(dest / CONSOLE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o444)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def restore(vm: VMProcess, *, timeout: float = 30.0) -> None:
    """Load a clone's device state (QEMU started with ``-incoming defer``) and let it run.

    Returns once QEMU took the commands; the guest runs as soon as the state is
    loaded (the caller waits for the agent). A state that does not load makes
    QEMU exit.

    Raises:
        VMMError: QMP failed (QEMU died, or refused the migration).
    """
    from ember.vmm.qmp import QMPClient

    assert vm.incoming_fd is not None, "restore of a machine started without a snapshot"
    deadline = time.monotonic() + timeout
    while True:
        try:
            q = QMPClient.connect(vm.socket_path(vm.spec.QMP_SOCKET), timeout=timeout)
            break
        except VMMError:
            vm.check_alive()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)
    with q:
        q.execute("migrate-set-capabilities", capabilities=_IGNORE_SHARED)
        q.execute("migrate-incoming", uri=f"fd:{vm.incoming_fd}")
        # During an incoming migration ``cont`` means: run once loaded.
        q.execute("cont")


def _send_fd(q: QMPClient, name: str, fd: int) -> None:
    """``getfd``: hand QEMU a descriptor over the QMP socket (SCM_RIGHTS)."""
    q.execute_with_fd("getfd", fd, fdname=name)


def _wait_migration(q: QMPClient, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        info = q.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise VMMError(f"{what} failed in QEMU: {info.get('error-desc', status)}")
        if time.monotonic() > deadline:
            with contextlib.suppress(VMMError):
                q.execute("migrate_cancel")
            raise VMMError(f"{what}: QEMU did not finish within {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def copy_into_memfd(src: int, spec: MachineSpec) -> int:
    """A memfd of the guest's size holding the data of the snapshot memory ``src``."""
    fd = os.memfd_create(f"ember-{spec.name}", os.MFD_CLOEXEC)
    try:
        size = spec.memory_mib << 20
        os.ftruncate(fd, size)
        _copy_extents(src, fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _copy_extents(src: int, out: int, size: int) -> int:
    """Copy the data extents (not the holes) of ``src`` to the same offsets of ``out``."""
    copied = 0
    off = 0
    while off < size:
        try:
            data = os.lseek(src, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after off
                break
            raise
        hole = min(os.lseek(src, data, os.SEEK_HOLE), size)
        _copy_range(src, out, data, hole - data)
        copied += hole - data
        off = hole
    return copied


def _copy_memory(src: int | None, dest: Path, size: int) -> int:
    """Copy the data (not the holes) of ``src`` into a new sparse file ``dest``; with no
    ``src``, ``dest`` is all holes."""
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    copied = 0
    try:
        os.ftruncate(out, size)
        copied = _copy_extents(src, out, size) if src is not None else 0
    except OSError as exc:
        raise VMMError(f"cannot write the snapshot's memory {dest}: {exc.strerror}") from exc
    finally:
        os.close(out)
    return copied


def _copy_layer(src: Path, dest: Path) -> None:
    from ember.volumes.layer import LAYER_FILE

    try:
        copy_sparse(src, dest / LAYER_FILE, 0o444)
    except OSError as exc:
        raise VMMError(f"cannot copy the root layer {src}: {exc.strerror}") from exc


def copy_sparse(src: Path, dest: Path, mode: int) -> int:
    """Copy the file ``src`` into a new file ``dest``, holes kept as holes: the bytes of
    data copied.

    Raises:
        OSError: either file.
    """
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.ftruncate(out, size)
            return _copy_extents(fd, out, size)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _copy_range(src: int, dst: int, off: int, count: int) -> None:
    """Copy ``count`` bytes at ``off`` from ``src`` to the same offset of ``dst``."""
    while count > 0:
        try:
            n = os.copy_file_range(src, dst, count, off, off)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = _pcopy(src, dst, off, count)
        if n == 0:
            raise OSError(errno.EIO, "short read of guest memory")
        off += n
        count -= n


def _pcopy(src: int, dst: int, off: int, count: int) -> int:
    data = os.pread(src, min(count, 1 << 20), off)
    if data:
        os.pwrite(dst, data, off)
    return len(data)
