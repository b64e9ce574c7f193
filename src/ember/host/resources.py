"""What a machine may ask of this host: vCPUs and memory, checked the same way for every path.

``ember run`` (foreground), ``ember create`` / ``run -d`` (the daemon) and the
API all call :func:`check_machine_shape`, so the same request gets the same
answer and message whichever way it comes, before QEMU is started.
"""

from __future__ import annotations

import os

from ember.errors import EmberError
from ember.vmm.spec import MAX_CPUS, MAX_MEMORY_MIB, MIN_MEMORY_MIB


class ShapeError(EmberError):
    """The machine asks for more (or less) than this host or QEMU can give."""


def host_memory_mib() -> int:
    """The host's memory (MemTotal) in MiB; 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return 0


def check_machine_shape(cpus: int, memory_mib: int) -> None:
    """Raise :class:`ShapeError` unless ``cpus`` vCPUs and ``memory_mib`` MiB fit this host."""
    if not 1 <= cpus <= MAX_CPUS:
        raise ShapeError(f"cpus: {cpus} is not between 1 and {MAX_CPUS}")
    if not MIN_MEMORY_MIB <= memory_mib <= MAX_MEMORY_MIB:
        raise ShapeError(f"memory: {memory_mib} MiB is not between {MIN_MEMORY_MIB} and "
                         f"{MAX_MEMORY_MIB} MiB")
    ncpu = os.cpu_count() or 1
    if cpus > ncpu:
        raise ShapeError(f"cpus: {cpus} is more than the host's {ncpu} CPUs")
    host_mib = host_memory_mib()
    if host_mib and memory_mib > host_mib:
        raise ShapeError(f"memory: {memory_mib} MiB is more than the host's {host_mib} MiB")
