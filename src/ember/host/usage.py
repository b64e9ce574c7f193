"""What a machine costs the host right now, read from its QEMU's cgroup and /proc.

The cgroup counts everything of the machine (QEMU and its threads); without
one (a host that gives Ember no cgroups) QEMU's own /proc entries do. I/O is
what QEMU read and wrote on the host's storage (``/proc/PID/io``): its disks
and snapshot files, as the host's block layer saw them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Usage:
    cpu_seconds: float  #: user + system CPU time since QEMU started
    memory_bytes: int  #: cgroup memory.current, else QEMU's resident set
    read_bytes: int  #: storage bytes QEMU read (``/proc/PID/io`` read_bytes)
    write_bytes: int


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _fields(text: str | None, sep: str = " ") -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(sep)
        value = value.strip().split(" ")[0]
        if value.isdigit():
            out[key.strip()] = int(value)
    return out


def qemu_usage(pid: int, cgroup_dirs: tuple[Path, ...] = ()) -> Usage | None:
    """Usage of the QEMU ``pid`` (None: it is gone), from ``cgroup_dirs`` where they
    hold the figures (v2 ``cpu.stat``/``memory.current``, v1 ``cpuacct.usage``/
    ``memory.usage_in_bytes``)."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    if stat is None:
        return None
    # fields after the command (which may hold spaces) in parentheses
    rest = stat.rsplit(")", 1)[-1].split()
    cpu = (int(rest[11]) + int(rest[12])) / _CLK_TCK
    memory = _fields(_read(Path(f"/proc/{pid}/status")), ":").get("VmRSS", 0) * 1024
    for d in cgroup_dirs:
        usage = _fields(_read(d / "cpu.stat")).get("usage_usec")
        if usage is not None:
            cpu = usage / 1e6
        else:
            with contextlib.suppress(TypeError, ValueError):
                cpu = int((_read(d / "cpuacct.usage") or "").strip()) / 1e9
        for name in ("memory.current", "memory.usage_in_bytes"):
            text = _read(d / name)
            if text is not None and text.strip().isdigit():
                memory = int(text.strip())
                break
    io = _fields(_read(Path(f"/proc/{pid}/io")), ":")
    return Usage(cpu, memory, io.get("read_bytes", 0), io.get("write_bytes", 0))
