"""The VMM's jail: every QEMU Ember starts runs confined, as far as the host allows.

As root (``full``), QEMU runs:

* as a uid/gid of its own, ``JAIL_UID_BASE + slot``: a slot is a number
  reserved host-wide by an ``flock`` on ``/run/ember/slots/N`` that QEMU itself
  inherits, so the reservation lasts exactly as long as QEMU does, whoever
  started it and whatever happens to that process. No supplementary groups
  but ``kvm`` (under KVM) and ``CLONE_GID`` (a clone, see below);
* with no capabilities (effective, permitted, inheritable, ambient and the
  bounding set all empty) and ``no_new_privs``;
* in new mount, PID, IPC, UTS and cgroup namespaces (bubblewrap), and a new
  network namespace too unless it uses slirp; its root is an empty tmpfs holding
  a read-only ``/usr`` (QEMU and its libraries), a minimal ``/dev`` (null, zero,
  random, urandom; ``/dev/kvm`` under KVM), its own ``/proc``, read-only binds of
  its kernel, initramfs and disks at their host paths, and one writable
  directory: ``STATE/vmm``, owned by its uid, where its sockets live. Nothing
  else of the host's files is there: not the rest of the state directory (the
  spec Ember trusts), not other machines';
* with QEMU's seccomp filter on every thread (``-sandbox on,obsolete=deny,
  elevateprivileges=deny,spawn=deny,resourcecontrol=deny``), installed by QEMU
  before it starts any thread; the uid is dropped before QEMU starts
  (``setpriv``, inside bubblewrap) so the set*id filter never fires;
* with rlimits on open files, file size and processes (its uid's threads),
  all inherited descriptors closed but those it needs, an empty environment,
  and its cgroup as before.

Without root (``rootless``), bubblewrap makes a user namespace (where the host
lets it) and the same mount, PID, IPC and UTS namespaces; QEMU keeps the
user's uid (there is no other to drop to). Where neither works (``seccomp``),
only QEMU's own seccomp filter applies. ``EMBER_JAIL=off`` turns everything off
(debugging only); ``ember doctor`` says which level machines get and why.

One gap QEMU 7.2 leaves: a clone maps its snapshot's memory file privately
(copy-on-write), and 7.2 opens such a file read-write even though it never
writes it (8.2 falls back to read-only). So snapshot memory files are made
group-writable by ``CLONE_GID``, which clones get: a subverted clone QEMU could
write the memory file of its own snapshot (the only one in its root), and so
the untouched pages of that snapshot's other clones. Nothing else on the host.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import select
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.errors import VMMError
from ember.util import log, try_lock

#: The first of the uids (and gids) jailed QEMUs run as: slot N runs as base + N.
#: Far above any real or subordinate (``/etc/subuid``) range; below 2**31, which
#: some tools still read as signed.
JAIL_UID_BASE = 2_000_000_000
#: Slots, and so machines jailed at once on one host.
SLOTS = 65536
#: The group that may open snapshot memory files read-write (QEMU 7.2; see above).
CLONE_GID = JAIL_UID_BASE - 1

#: QEMU's own seccomp filter: a denylist on every thread.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

#: rlimits of a jailed QEMU: open files (drives, sockets, eventfds), the largest
#: file it may write through write() (its RAM and disks are mapped or preallocated
#: by Ember, so this bounds only logs and migration streams), its uid's threads.
RLIMIT_NOFILE = 4096
RLIMIT_FSIZE = 8 << 30
RLIMIT_NPROC = 512

MODE_FULL = "full"
MODE_ROOTLESS = "rootless"
MODE_SECCOMP = "seccomp"
MODE_OFF = "off"

#: The writable directory of a jailed QEMU in its state directory.
VMM_DIR = "vmm"


@dataclass(frozen=True)
class Policy:
    """The confinement this host gives machines, and why not more."""

    mode: str
    reason: str
    #: What could not be done (empty at ``full``).
    missing: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "reason": self.reason, "missing": list(self.missing)}


@functools.cache
def policy() -> Policy:
    """What confinement machines started by this process get (probed once)."""
    setting = os.environ.get("EMBER_JAIL", "").strip().lower()
    if setting in ("0", "off", "no", "false"):
        return Policy(MODE_OFF, "turned off by EMBER_JAIL", ("namespaces", "uid", "seccomp"))
    bwrap, setpriv = shutil.which("bwrap"), shutil.which("setpriv")
    if setting == MODE_SECCOMP:
        return Policy(MODE_SECCOMP, "limited to QEMU's seccomp filter by EMBER_JAIL",
                      ("namespaces", "uid"))
    if bwrap is None:
        return Policy(MODE_SECCOMP, "bubblewrap is not installed (run `ember setup`)",
                      ("namespaces", "uid"))
    if os.geteuid() == 0 and setting != MODE_ROOTLESS:
        if setpriv is None:
            return Policy(MODE_SECCOMP, "setpriv (util-linux) is not installed",
                          ("namespaces", "uid"))
        return Policy(MODE_FULL, "root: an own uid per machine, no capabilities, namespaces, "
                      "seccomp")
    why = _userns_error(bwrap)
    if why:
        return Policy(MODE_SECCOMP, f"not root, and no user namespaces here ({why})",
                      ("namespaces", "uid"))
    return Policy(MODE_ROOTLESS, "not root: a user namespace with mount, PID, IPC and UTS "
                  "namespaces and seccomp; QEMU keeps your uid", ("uid",))


def _userns_error(bwrap: str) -> str:
    """Why bubblewrap cannot make a user namespace here ("" if it can)."""
    try:
        proc = subprocess.run([bwrap, "--unshare-user", "--unshare-pid", "--ro-bind", "/", "/",
                               "--", "true"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if proc.returncode == 0:
        return ""
    return (proc.stderr.strip().splitlines() or [f"status {proc.returncode}"])[-1]


def _slots_dir() -> Path:
    return Path(os.environ.get("EMBER_SLOTS_DIR", "/run/ember/slots"))


@dataclass
class Slot:
    """A host-wide number reserved by an ``flock`` (QEMU inherits the descriptor)."""

    number: int
    fd: int

    @property
    def uid(self) -> int:
        return JAIL_UID_BASE + self.number

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def reserve_slot(hint: str = "") -> Slot:
    """Reserve a free slot, starting the search at a number derived from ``hint``.

    A slot is free when nobody holds its lock: its last QEMU has exited, however
    it ended, and the background teardown of its network (``vmm/netns.py``), which
    holds the lock too, is done.

    Raises:
        VMMError: every slot is taken, or the slots directory cannot be made.
    """
    import zlib

    d = _slots_dir()
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise VMMError(f"cannot make {d}: {exc.strerror}") from exc
    start = zlib.crc32(hint.encode()) % SLOTS
    for i in range(SLOTS):
        n = (start + i) % SLOTS
        fd = try_lock(d / str(n), create=True)
        if fd is not None:
            return Slot(n, fd)
    raise VMMError(f"all {SLOTS} jail slots are in use")


def hold_free_slot(number: int) -> int | None:
    """Lock slot ``number`` if it is free: the descriptor holding it, or None if in use."""
    d = _slots_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return try_lock(d / str(number), create=True)


@dataclass(frozen=True)
class Mounts:
    """What a jailed QEMU sees of the host's files, at their host paths."""

    readonly: tuple[Path, ...] = ()
    writable: tuple[Path, ...] = ()
    #: Device nodes bound in (``/dev/kvm``).
    devices: tuple[str, ...] = ()
    #: The working directory inside the jail.
    chdir: Path | None = None
    #: Host shares: (host path, path in the jail, read-only), bound under a
    #: directory of their own (``volumes/shares.py``).
    shares: tuple[tuple[Path, str, bool], ...] = ()


def bwrap_args(mounts: Mounts, *, bwrap: str, share_net: bool, userns: bool,
               info_fd: int, die_with_parent: bool,
               seccomp_fd: int | None = None) -> list[str]:
    """bubblewrap's command line (up to the command it runs) for ``mounts``.

    Every bind target keeps its host path. bubblewrap makes a missing parent
    of a bind with mode 0700, which QEMU's uid could not cross, so each parent
    is made first with mode 0755.

    bubblewrap's own init is PID 1 of the new namespace and QEMU its child:
    with ``die_with_parent`` that init kills the namespace when bubblewrap's
    parent (``ember run``) dies. A parent-death signal set on QEMU itself would
    not do, as the kernel does not deliver it to a namespace's PID 1.

    ``seccomp_fd``: a filter bubblewrap loads before it runs QEMU, on top of
    QEMU's own (``host/modefilter.py``).
    """
    args = [bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--clearenv", "--info-fd", str(info_fd)]
    if seccomp_fd is not None:
        args += ["--seccomp", str(seccomp_fd)]
    if die_with_parent:
        args.append("--die-with-parent")
    if userns:
        args += ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    if not share_net:
        args.append("--unshare-net")
    args += ["--ro-bind", "/usr", "/usr"]
    for name in ("lib", "lib64", "bin", "sbin"):
        if os.path.islink(f"/{name}"):
            args += ["--symlink", f"usr/{name}", f"/{name}"]
        elif os.path.isdir(f"/{name}"):
            args += ["--ro-bind", f"/{name}", f"/{name}"]
    args += ["--dev", "/dev", "--proc", "/proc"]
    if share_net:
        # libslirp reads the host's resolver when the guest first asks a name.
        for f in ("/etc/resolv.conf", "/etc/hosts"):
            if os.path.exists(f):
                args += ["--ro-bind", os.path.realpath(f), f]
    targets = [*mounts.readonly, *mounts.writable]
    if mounts.chdir is not None:
        targets.append(mounts.chdir / "_")
    for d in _parents(targets):
        args += ["--perms", "0755", "--dir", str(d)]
    for p in mounts.readonly:
        args += ["--ro-bind", str(p), str(p)]
    for p in mounts.writable:
        args += ["--bind", str(p), str(p)]
    for dev in mounts.devices:
        args += ["--dev-bind", dev, dev]
    if mounts.shares:
        from ember.volumes.shares import SHARES_ROOT

        args += ["--perms", "0755", "--dir", SHARES_ROOT]
    for src, dest, ro in mounts.shares:
        args += ["--ro-bind" if ro else "--bind", str(src), dest]
    if mounts.chdir is not None:
        args += ["--chdir", str(mounts.chdir)]
    return args


def _parents(paths: Iterable[Path]) -> list[Path]:
    """The directories to make (outermost first) so that ``paths`` can be bound."""
    out: set[Path] = set()
    for p in paths:
        for parent in p.parents:
            if parent == Path("/") or parent == Path("/usr") or Path("/usr") in parent.parents:
                continue
            if parent in (Path("/dev"), Path("/proc")):
                continue
            out.add(parent)
    return sorted(out, key=lambda p: (len(p.parts), str(p)))


def setpriv_args(uid: int, gid: int, groups: tuple[int, ...], *, setpriv: str) -> list[str]:
    """``setpriv``'s command line: drop to ``uid``, no capabilities, no_new_privs."""
    args = [setpriv, f"--reuid={uid}", f"--regid={gid}"]
    args += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return args + ["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
                   "--no-new-privs"]


def kvm_gid() -> int | None:
    """The group owning ``/dev/kvm`` (None without one)."""
    try:
        return os.stat("/dev/kvm").st_gid
    except OSError:
        return None


def rlimits(fsize: int = RLIMIT_FSIZE) -> Callable[[], None]:
    """The jail's rlimits, to apply in a child between fork and exec; ``fsize``: the
    largest file QEMU may write (its largest disk: it must reach a disk's end)."""
    def apply() -> None:
        for which, value in ((resource.RLIMIT_NOFILE, RLIMIT_NOFILE),
                             (resource.RLIMIT_FSIZE, max(fsize, RLIMIT_FSIZE)),
                             (resource.RLIMIT_NPROC, RLIMIT_NPROC)):
            soft, hard = resource.getrlimit(which)
            lim = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (lim, lim))
    return apply



def read_child_pid(fd: int, timeout: float = 10.0) -> int:
    """The host pid of the command bubblewrap runs (the child of its PID 1).

    bubblewrap writes its init's pid to ``--info-fd``; the command is the one
    child of that init, listed as soon as it is forked.

    Raises:
        VMMError: bubblewrap exited or said nothing in time.
    """
    import time

    init = _read_info_pid(fd, timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{init}/task/{init}/children") as f:
                children = f.read().split()
        except OSError:
            raise VMMError("the jail (bubblewrap) exited before it started QEMU") from None
        if children:
            return int(children[0])
        if time.monotonic() > deadline:
            raise VMMError(f"the jail (bubblewrap) did not start QEMU within {timeout:.0f} s")
        time.sleep(0.0005)


def _read_info_pid(fd: int, timeout: float) -> int:
    buf = b""
    while True:
        ready = select.select([fd], [], [], timeout)[0]
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            raise VMMError("the jail (bubblewrap) failed to start QEMU"
                           + ("" if ready else f" within {timeout:.0f} s"))
        buf += chunk
        with contextlib.suppress(ValueError):
            pid = json.loads(buf)["child-pid"]
            if isinstance(pid, int):
                return pid


def prepare_vmm_dir(state_dir: Path, uid: int | None, gid: int | None) -> Path:
    """Make ``STATE/vmm``, the one directory QEMU may write, owned by its uid."""
    d = state_dir / VMM_DIR
    d.mkdir(mode=0o700, exist_ok=True)
    if uid is not None and gid is not None:
        os.chown(d, uid, gid)
    return d


def give(path: str | Path, uid: int | None, gid: int | None) -> None:
    """Hand a file Ember made (the console socket) to the VMM's uid."""
    if uid is not None and gid is not None:
        os.chown(path, uid, gid)


def allow_clones(memory: Path, *, jailed_uid: bool) -> None:
    """Let clone QEMUs open a snapshot's memory file (QEMU 7.2 opens it read-write).

    ``jailed_uid``: clones run as uids of their own, which get it through
    ``CLONE_GID``; otherwise QEMU runs as the file's owner, who needs the write bit
    (snapshots are written 0444), as root does not.
    """
    st = memory.stat()
    if jailed_uid:
        if st.st_gid != CLONE_GID or st.st_mode & 0o777 != 0o660:
            os.chown(memory, st.st_uid, CLONE_GID)
            os.chmod(memory, 0o660)
    elif os.geteuid() != 0 and not st.st_mode & 0o200:
        os.chmod(memory, (st.st_mode & 0o777) | 0o200)


# --- What a running QEMU really got, read from /proc -------------------------

_NAMESPACES = ("mnt", "pid", "net", "ipc", "uts", "user", "cgroup")


def observe(pid: int) -> dict[str, Any] | None:
    """The confinement of process ``pid`` as the kernel reports it (None if it is gone).

    ``namespaces`` lists those it does not share with this process; ``seccomp``
    is true when every one of its threads runs under a seccomp filter.
    """
    try:
        status = _status(f"/proc/{pid}/status")
        threads = os.listdir(f"/proc/{pid}/task")
        seccomp = all(_status(f"/proc/{pid}/task/{t}/status").get("Seccomp") == "2"
                      for t in threads)
        own = []
        for ns in _NAMESPACES:
            with contextlib.suppress(FileNotFoundError):
                if os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"):
                    own.append(ns)
        root = os.stat(f"/proc/{pid}/root")
        host_root = os.stat("/")
    except (OSError, ValueError):
        return None
    return {
        "uid": int(status["Uid"].split()[1]),
        "gid": int(status["Gid"].split()[1]),
        "capabilities": status.get("CapEff", ""),
        "no_new_privs": status.get("NoNewPrivs") == "1",
        "seccomp": seccomp,
        "namespaces": own,
        "own_root": (root.st_dev, root.st_ino) != (host_root.st_dev, host_root.st_ino),
        "threads": len(threads),
    }


def _status(path: str) -> dict[str, str]:
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def preexec(*steps: Callable[[], None] | None) -> Callable[[], None] | None:
    """One ``preexec_fn`` running ``steps`` in order (None when there are none)."""
    todo = [s for s in steps if s is not None]
    if not todo:
        return None

    def run() -> None:
        for step in todo:
            step()
    return run


def warn_once(message: str) -> None:
    """Log a confinement shortfall once per process."""
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


_warned: set[str] = set()
