"""CPU and memory limits for a machine's QEMU process, through the kernel's cgroups.

A machine gets ``cpus`` vCPUs and ``memory_mib`` of guest RAM from its spec;
without a cgroup nothing stops its QEMU from using every host core (TCG's
translator threads, I/O threads) or from growing past the guest's RAM (the
translation cache, device buffers, leaks). With one, the kernel enforces what
the spec says: ``cpus`` cores' worth of CPU time per period, and a memory
ceiling past which the kernel reclaims and, at worst, OOM-kills that QEMU and
nothing else.

Where the cgroups go. The state lives in the kernel, not in Ember: a cgroup
is a directory ``…/ember/<machine name>`` that a restarted daemon finds again
by name (``MachineCgroup.find``).

* cgroup v2 (one hierarchy, normally at ``/sys/fs/cgroup``): limits are
  ``cpu.max`` (``"<quota> <period>"`` in µs, quota = cpus × period) and
  ``memory.max`` (bytes; ``memory.swap.max`` = 0 where swap accounting exists,
  so the guest cannot spill into swap instead). Two rules shape the layout: a
  controller works in a child only if the parent lists it in
  ``cgroup.subtree_control``, and a non-root cgroup that holds processes may
  not enable controllers for its children ("no internal processes"). So the
  ``ember`` directory is created in Ember's own cgroup only when that is the
  hierarchy's root; otherwise Ember's own cgroup holds Ember, and ``ember`` is
  made next to it, in its parent, which must be the root or already delegate
  ``cpu`` and ``memory`` (systemd: ``Delegate=yes`` with ``DelegateSubgroup=``;
  a container: the entrypoint moved into a leaf). Ember never moves processes
  to make room. The top of a cgroup namespace is not the root: it obeys the
  rule, and its parent is out of sight.
* cgroup v1 (one hierarchy per controller, e.g. ``/sys/fs/cgroup/cpu`` and
  ``/sys/fs/cgroup/memory``, sometimes next to a controller-less v2 at
  ``/sys/fs/cgroup/unified``): ``cpu.cfs_period_us`` / ``cpu.cfs_quota_us``
  and ``memory.limit_in_bytes`` (plus ``memory.memsw.limit_in_bytes`` equal
  to it, where present: no swap beyond the limit). v1 has no
  internal-process rule, so ``ember`` sits inside Ember's own cgroup of each
  hierarchy, under whatever limits Ember itself runs with.

v2 is used when it has the controllers; v1 otherwise. Everything takes the
cgroup mount directory and the ``/proc/self`` directory as parameters, so the
tests run the same code on fake trees.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import HostError
from ember.util import log

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF = Path("/proc/self")
#: The directory under the chosen parent that holds one cgroup per machine.
EMBER_DIR = "ember"
#: The CFS bandwidth period, µs (the kernel's default): quota = cpus × period.
CPU_PERIOD_US = 100_000
CONTROLLERS = ("cpu", "memory")

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

# A fake tree's directories hold regular files, which a real cgroup's
# never do (its control files vanish with it): the tests replace this.
_rmdir = os.rmdir


@dataclass(frozen=True)
class CgroupSupport:
    """Whether machines can get cgroup limits here, and where their cgroups go.

    ``dirs`` maps each usable controller to the ``ember`` directory machine
    cgroups are made in (under v2 the same directory for both); it is empty,
    with ``version`` None, when limits are not possible, and ``reason`` says why.
    """

    version: int | None
    dirs: Mapping[str, Path] = field(default_factory=dict)
    reason: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.dirs)

    @property
    def controllers(self) -> tuple[str, ...]:
        return tuple(c for c in CONTROLLERS if c in self.dirs)


def probe(root: Path = CGROUP_ROOT, proc_self: Path = PROC_SELF) -> CgroupSupport:
    """Which cgroup version and controllers this process can use for machines, and why.

    Creates nothing; writability is judged by permissions (a read-only mount,
    as in most containers, fails it).
    """
    own = _own_cgroups(proc_self)
    mount_roots = _mount_roots(proc_self)
    why: list[str] = []
    for mount in (root, root / "unified"):
        if (mount / "cgroup.controllers").is_file():
            v2 = _probe_v2(mount, own.get("", "/"), mount_roots)
            if v2.ok:
                return v2
            why.append(v2.reason)
            break
    v1 = _probe_v1(root, own, mount_roots)
    if v1.ok or not why:
        return v1
    if v1.reason and "no cgroup v1" not in v1.reason:
        why.append(v1.reason)
    return CgroupSupport(None, {}, "; ".join(why))


def _probe_v2(mount: Path, own_path: str, mount_roots: Mapping[str, str]) -> CgroupSupport:
    own = _resolve(mount, own_path, mount_roots)
    if own is None or not own.is_dir():
        return CgroupSupport(None, {}, f"cgroup v2 at {mount}: cannot find this process's "
                                       f"cgroup {own_path}")
    if _is_true_root(mount, own):
        base = own
        usable = [c for c in CONTROLLERS if c in _read_words(own / "cgroup.controllers")]
        if not usable:
            return CgroupSupport(None, {}, f"cgroup v2 at {mount} has no cpu or memory "
                                           "controller")
    elif own == mount:
        return CgroupSupport(None, {}, (
            f"cgroup v2: this process is in the top cgroup of its namespace ({mount}), "
            "which cannot give controllers to children while it holds processes"))
    else:
        base = own.parent
        # The true root may enable controllers itself; any other parent must
        # already delegate them.
        offered = ("cgroup.controllers" if _is_true_root(mount, base)
                   else "cgroup.subtree_control")
        usable = [c for c in CONTROLLERS if c in _read_words(base / offered)]
        if not usable:
            return CgroupSupport(None, {}, (
                f"cgroup v2: this process's cgroup {own} holds processes, so it cannot give "
                f"controllers to children, and its parent does not delegate cpu or memory "
                f"(systemd: Delegate=yes with DelegateSubgroup=)"))
    if not _writable(base):
        return CgroupSupport(None, {}, f"cgroup v2: {base} is not writable")
    ember = base / EMBER_DIR
    return CgroupSupport(2, {c: ember for c in usable},
                         f"cgroup v2: {', '.join(usable)} limits under {ember}")


def _probe_v1(root: Path, own: Mapping[str, str],
              mount_roots: Mapping[str, str]) -> CgroupSupport:
    probes = {"cpu": "cpu.cfs_quota_us", "memory": "memory.limit_in_bytes"}
    dirs: dict[str, Path] = {}
    problems: list[str] = []
    for ctrl, knob in probes.items():
        mount = root / ctrl
        if not (mount / knob).is_file():
            continue
        own_dir = _resolve(mount, own.get(ctrl, "/"), mount_roots)
        if own_dir is None or not own_dir.is_dir():
            problems.append(f"cannot find this process's {ctrl} cgroup")
        elif not _writable(own_dir):
            problems.append(f"{own_dir} is not writable")
        else:
            dirs[ctrl] = own_dir / EMBER_DIR
    if dirs:
        where = ", ".join(f"{c} under {d}" for c, d in dirs.items())
        return CgroupSupport(1, dirs, f"cgroup v1: {where}"
                             + (f" ({'; '.join(problems)})" if problems else ""))
    if problems:
        return CgroupSupport(None, {}, "cgroup v1: " + "; ".join(problems))
    return CgroupSupport(None, {}, f"no cgroup v1 cpu or memory hierarchy under {root}")


def _own_cgroups(proc_self: Path) -> dict[str, str]:
    """This process's cgroup per v1 controller, and under ``""`` its v2 cgroup."""
    out: dict[str, str] = {}
    try:
        text = (proc_self / "cgroup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if not ctrls:
            out[""] = path
        for ctrl in ctrls.split(","):
            if ctrl:
                out[ctrl] = path
    return out


def _mount_roots(proc_self: Path) -> dict[str, str]:
    """Mount point → the directory of the hierarchy it shows (not ``/`` for a bind mount)."""
    out: dict[str, str] = {}
    try:
        text = (proc_self / "mountinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4:
            out[fields[4]] = fields[3]
    return out


def _resolve(mount: Path, path: str, mount_roots: Mapping[str, str]) -> Path | None:
    """The directory of cgroup ``path`` (as /proc/self/cgroup names it) under ``mount``."""
    mroot = (mount_roots.get(str(mount)) or mount_roots.get(os.path.realpath(mount))
             or "/").rstrip("/")
    if mroot:
        if path != mroot and not path.startswith(mroot + "/"):
            return None  # our cgroup is outside what this mount shows
        path = path[len(mroot):]
    return mount / path.lstrip("/") if path.strip("/") else mount


def _is_true_root(mount: Path, cgroup: Path) -> bool:
    """Whether ``cgroup`` is the hierarchy's root, exempt from the no-internal-processes rule.

    Only the true root lacks ``cgroup.type``; the top of a cgroup namespace
    (a container's "/") has one and obeys the rule like any other cgroup.
    """
    return cgroup == mount and not (cgroup / "cgroup.type").exists()


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)


def _read_words(path: Path) -> list[str]:
    try:
        return [w.lstrip("+") for w in path.read_text().split()]
    except OSError:
        return []


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class MachineCgroup:
    """The cgroup(s) of one machine: ``<ember dir>/<name>`` in each usable hierarchy."""

    def __init__(self, name: str, version: int, dirs: Mapping[str, Path]) -> None:
        self.name = name
        self.version = version
        #: controller → this machine's cgroup directory (the same one for both, under v2)
        self.dirs = dict(dirs)

    def __repr__(self) -> str:
        return f"MachineCgroup({self.name!r}, v{self.version}, {self.path})"

    @property
    def paths(self) -> tuple[Path, ...]:
        """The distinct cgroup directories (one under v2, one per controller under v1)."""
        return tuple(dict.fromkeys(self.dirs.values()))

    @property
    def path(self) -> Path:
        """The memory cgroup if there is one, else the cpu one (for display)."""
        return self.dirs.get("memory") or next(iter(self.dirs.values()))

    @classmethod
    def create(cls, name: str, cpus: float, memory_mib: int,
               support: CgroupSupport | None = None) -> MachineCgroup | None:
        """A new cgroup for machine ``name``: ``cpus`` CPUs' worth of time, ``memory_mib`` at most.

        ``memory_mib`` is the cgroup's limit, QEMU's overhead included (see
        ``vmm.process.memory_limit_mib``). An empty cgroup of that name left by an
        earlier run is replaced. Returns None, with the reason logged, where limits
        are not possible or the kernel refuses them.

        Raises:
            HostError: ``name`` cannot name a cgroup, or the limits are out of range.
        """
        _check_name(name)
        if cpus <= 0 or memory_mib <= 0:
            raise HostError(f"cgroup limits must be positive (cpus={cpus}, "
                            f"memory={memory_mib} MiB)")
        support = support or probe()
        if not support.ok:
            log.warning("machine %s runs without resource limits: %s", name, support.reason)
            return None
        assert support.version is not None
        cg = cls(name, support.version, {c: d / name for c, d in support.dirs.items()})
        created: list[Path] = []
        try:
            cg._make(support, cpus, memory_mib, created)
        except OSError as exc:
            reason = f"{exc.filename or ''}: {exc.strerror}" if exc.strerror else str(exc)
            log.warning("machine %s runs without resource limits: cannot set up its cgroup "
                        "(%s)", name, reason)
            for d in created:  # only what this call made: a same-named cgroup may be live
                try:
                    _rmdir(d)
                except OSError as err:
                    log.warning("cannot remove cgroup %s: %s", d, err.strerror)
            return None
        return cg

    def _make(self, support: CgroupSupport, cpus: float, memory_mib: int,
              created: list[Path]) -> None:
        if self.version == 2:
            ember = next(iter(support.dirs.values()))
            _enable(ember.parent, self.dirs)  # the root: no-op where it delegates already
            ember.mkdir(exist_ok=True)
            _enable(ember, self.dirs)
        for d in self.paths:
            d.parent.mkdir(exist_ok=True)
            try:
                d.mkdir()
            except FileExistsError:
                if self._pids(d):
                    raise OSError(errno.EBUSY, "a cgroup of that name has processes",
                                  str(d)) from None
                _rmdir(d)  # a leftover: start from the kernel's defaults again
                d.mkdir()
            created.append(d)
        quota = round(cpus * CPU_PERIOD_US)
        limit = memory_mib << 20
        if self.version == 2:
            d = self.path
            if "cpu" in self.dirs:
                _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            if "memory" in self.dirs:
                _write(d / "memory.max", str(limit))
                if (d / "memory.swap.max").exists():
                    _write(d / "memory.swap.max", "0")
        else:
            if "cpu" in self.dirs:
                _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
            if "memory" in self.dirs:
                m = self.dirs["memory"]
                _write(m / "memory.limit_in_bytes", str(limit))
                # memsw must be at least the limit: written after it.
                if (m / "memory.memsw.limit_in_bytes").exists():
                    _write(m / "memory.memsw.limit_in_bytes", str(limit))

    @classmethod
    def find(cls, name: str, support: CgroupSupport | None = None) -> MachineCgroup | None:
        """The cgroup of machine ``name`` if it exists (after a daemon restart, say)."""
        _check_name(name)
        support = support or probe()
        if not support.ok:
            return None
        assert support.version is not None
        dirs = {c: d / name for c, d in support.dirs.items() if (d / name).is_dir()}
        return cls(name, support.version, dirs) if dirs else None

    def open_procs(self) -> list[int]:
        """Write-only fds on each ``cgroup.procs`` (close-on-exec), for ``join_fds`` in a child.

        Raises:
            OSError: a cgroup is gone.
        """
        fds: list[int] = []
        try:
            for d in self.paths:
                fds.append(os.open(d / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this cgroup.

        Raises:
            HostError: the kernel refused (no such process, or the cgroup is gone).
        """
        for d in self.paths:
            try:
                _write(d / "cgroup.procs", str(pid))
            except OSError as exc:
                raise HostError(f"cannot move process {pid} into cgroup {d}: "
                                f"{exc.strerror}") from exc

    def pids(self) -> list[int]:
        """The processes in this cgroup (in any of its hierarchies)."""
        return sorted({p for d in self.paths for p in self._pids(d)})

    @staticmethod
    def _pids(d: Path) -> list[int]:
        try:
            return [int(x) for x in (d / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    def limits(self) -> dict[str, Any]:
        """The limits in force and current use, read back from the kernel (for inspect)."""
        out: dict[str, Any] = {"version": self.version,
                               "paths": {c: str(d) for c, d in self.dirs.items()}}
        if self.version == 2:
            d = self.path
            if "cpu" in self.dirs:
                out["cpus"] = _cpus_v2(_read(d / "cpu.max"))
            if "memory" in self.dirs:
                out["memory_max_bytes"] = _int_or_none(_read(d / "memory.max"))
                out["memory_current_bytes"] = _int_or_none(_read(d / "memory.current"))
                out["memory_peak_bytes"] = _int_or_none(_read(d / "memory.peak"))
                out["oom_kills"] = _events(d / "memory.events").get("oom_kill")
        else:
            if "cpu" in self.dirs:
                c = self.dirs["cpu"]
                quota = _int_or_none(_read(c / "cpu.cfs_quota_us"))
                period = _int_or_none(_read(c / "cpu.cfs_period_us"))
                out["cpus"] = quota / period if quota and quota > 0 and period else None
            if "memory" in self.dirs:
                m = self.dirs["memory"]
                out["memory_max_bytes"] = _int_or_none(_read(m / "memory.limit_in_bytes"))
                out["memory_current_bytes"] = _int_or_none(_read(m / "memory.usage_in_bytes"))
                out["memory_peak_bytes"] = _int_or_none(_read(m / "memory.max_usage_in_bytes"))
                out["oom_kills"] = _events(m / "memory.oom_control").get("oom_kill")
        return out

    def remove(self, timeout: float = 5.0) -> None:
        """Delete the cgroup, SIGKILLing anything still in it. Idempotent.

        A process leaves its cgroup when it exits (before it is reaped), so once
        QEMU is dead this succeeds at once; a process still exiting holds it for a
        moment, hence the wait.

        Raises:
            HostError: the cgroup still had processes after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        for d in self.paths:
            delay = 0.001
            while True:
                try:
                    _rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise HostError(f"cannot remove cgroup {d}: {exc.strerror}") from exc
                    pids = self._pids(d)
                    if time.monotonic() > deadline:
                        raise HostError(f"cannot remove cgroup {d}: processes "
                                        f"{' '.join(map(str, pids))} did not exit") from exc
                    for pid in pids:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name) or name.startswith(("cgroup.", "cpu.", "memory.")):
        raise HostError(f"invalid machine name for a cgroup: {name!r}")


def _enable(parent: Path, dirs: Mapping[str, Path]) -> None:
    """Enable the controllers of ``dirs`` in ``parent/cgroup.subtree_control`` if not yet."""
    have = set(_read_words(parent / "cgroup.subtree_control"))
    missing = [c for c in CONTROLLERS if c in dirs and c not in have]
    if missing:
        _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None  # "max"


def _cpus_v2(text: str | None) -> float | None:
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max" or not period:
        return None
    return int(quota) / int(period)


def _events(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out
