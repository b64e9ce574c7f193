"""Live figures of machines: host usage (``host/usage.py``) and the guest's processes.

The usage is read from each machine's QEMU (cgroup and /proc) at request time;
the process list comes from busybox ``ps`` run in the guest as the host-sent tool
(``files.py``), so it works whatever the image holds.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from ember.daemon.errors import Conflict

if TYPE_CHECKING:
    from ember.daemon.managed import Managed

#: Seconds a reading in the guest may take before it is given up.
TOOL_TIMEOUT = 5.0
#: The columns ``top`` shows (busybox ``ps -o``).
TOP_COLUMNS = "pid,ppid,user,stat,vsz,rss,args"


def stats_of(mm: Managed) -> dict[str, Any]:
    """The ``MachineStats`` of ``mm`` (zeros for a machine without a running QEMU)."""
    from ember.host.usage import qemu_usage

    doc = mm.public()
    out: dict[str, Any] = {
        "name": doc["name"], "id": doc["id"], "state": doc["state"], "time": time.time(),
        "cpu_seconds": 0.0, "cpus": int(doc.get("cpus") or 1), "memory_bytes": 0,
        "memory_limit_bytes": int(doc.get("memory_mib") or 0) << 20,
        "storage_read_bytes": 0, "storage_write_bytes": 0}
    m = mm.machine
    vm = m.vm if m is not None else None
    if vm is not None:
        usage = qemu_usage(vm.pid, vm.cgroup.paths if vm.cgroup is not None else ())
        if usage is not None:
            out.update(cpu_seconds=usage.cpu_seconds, memory_bytes=usage.memory_bytes,
                       storage_read_bytes=usage.read_bytes,
                       storage_write_bytes=usage.write_bytes)
    if m is not None and doc["state"] == "running":
        net = network_of(mm)
        if net is not None:
            out.update(network_rx_bytes=net[0], network_tx_bytes=net[1])
    return out


def network_of(mm: Managed) -> tuple[int, int] | None:
    """The guest's received and sent bytes over its interfaces but lo (its /proc/net/dev,
    read with the tool); None if it cannot be read."""
    from ember.errors import EmberError
    from ember.files import run_tool

    try:
        machine = mm.running_machine("stats")
        code, out, _err = run_tool(machine, ["cat", "/proc/net/dev"], limit=65536,
                                   timeout=TOOL_TIMEOUT)
    except EmberError:
        return None
    if code != 0:
        return None
    return parse_net_dev(out.decode(errors="replace"))


def parse_net_dev(text: str) -> tuple[int, int]:
    """Received and sent bytes summed over the interfaces of ``/proc/net/dev`` but lo."""
    rx = tx = 0
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or name.strip() == "lo" or len(fields) < 9:
            continue
        with contextlib.suppress(ValueError):
            rx += int(fields[0])
            tx += int(fields[8])
    return rx, tx


def top_of(mm: Managed) -> dict[str, Any]:
    """The guest's processes (``GuestProcesses``): busybox ``ps`` in the guest."""
    from ember.errors import EmberError
    from ember.files import run_tool

    machine = mm.running_machine("top")
    try:
        code, out, err = run_tool(machine, ["ps", "-o", TOP_COLUMNS], timeout=TOOL_TIMEOUT)
    except EmberError as exc:
        raise Conflict(f"machine {mm.name}: {exc}") from None
    if code != 0:
        raise Conflict(f"machine {mm.name}: ps failed: {err.strip() or f'exit status {code}'}")
    lines = out.decode(errors="replace").splitlines()
    if not lines:
        return {"titles": [], "processes": []}
    titles = lines[0].split()
    rows = [line.split(None, len(titles) - 1) for line in lines[1:] if line.strip()]
    # the guest's own programs: not the kernel's threads (kthreadd, pid 2, and its
    # children), nor the ps that made the list
    rows = [r for r in rows if len(r) == len(titles) and r[0] != "2" and r[1] != "2"
            and not r[-1].startswith("{memfd:ember-")]
    return {"titles": titles, "processes": rows}


def changes_of(mm: Managed) -> list[dict[str, str]]:
    """What the running machine changed in its root (``ember diff``, ``changes.py``)."""
    from ember.changes import changes
    from ember.errors import EmberError

    machine = mm.running_machine("diff")
    try:
        return [c.to_json() for c in changes(machine, timeout=TOOL_TIMEOUT)]
    except EmberError as exc:
        raise Conflict(f"machine {mm.name}: {exc}") from None
