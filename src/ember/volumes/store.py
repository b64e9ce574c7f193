"""Named volumes: a sparse ext4 image per volume under ``$EMBER_HOME/volumes``.

A volume is ``volumes/NAME/volume.img`` (a sparse file, ext4 made by
``mkfs.ext4`` when the volume is created, never mounted on the host) and
``volume.json`` (name, size, created). A machine's volumes are the LUNs of one
virtio-scsi controller (LUN N is its volume N: one virtio-mmio transport for
them all, ``vmm/qemu.py``), and the guest agent mounts each at the path asked
for (``ember.volumes=`` on the kernel command line).

In use means attached to a running machine: the machine's QEMU inherits an
``flock`` on ``volumes/NAME/lock`` (as a jail slot's, ``host/jail.py``), held
exactly as long as that QEMU lives. A second machine asking for the same volume
(read-write or read-only: an ext4 mounted twice is corrupted) is refused at
its start (``VolumeInUse``, a 409), and so is ``rm`` of a volume in use.

A machine with a volume cannot be snapshotted: the guest's kernel holds the
filesystem's state in memory, which a restore would pair with another disk's
contents. It does start warm from a boot snapshot of its shape, which is taken
before the guest mounts anything of its disks (the late root, ``machine.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.errors import EmberError
from ember.util import try_lock
from ember.volumes.shares import ShareMount

#: A volume's name: Docker's rule (no ``/``, which marks a host path).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
#: Where a volume may be mounted in the guest: an absolute path of plain characters
#: (it travels on the kernel command line).
TARGET_RE = re.compile(r"/[A-Za-z0-9._/-]{1,200}")
DEFAULT_SIZE = 10 << 30
MIN_SIZE = 16 << 20
MAX_SIZE = 16 << 40
#: Volumes one machine may mount (LUNs of its one SCSI controller; the bound is the
#: kernel command line they travel on).
MAX_PER_MACHINE = 16
#: The kernel command line's size on x86 (``COMMAND_LINE_SIZE``), less room for
#: what the kernel and QEMU append (``virtio_mmio.device=`` entries).
CMDLINE_MAX = 2048 - 512

IMAGE = "volume.img"
META = "volume.json"
LOCK = "lock"


class VolumeError(EmberError):
    pass


class VolumeNotFound(VolumeError):
    pass


class VolumeExists(VolumeError):
    pass


class VolumeInUse(VolumeError):
    pass


@dataclass(frozen=True)
class VolumeRequest:
    """``-v NAME:/path[:ro]``: a volume asked for by name."""

    name: str
    target: str
    readonly: bool = False

    def __str__(self) -> str:
        return f"{self.name}:{self.target}" + (":ro" if self.readonly else "")


@dataclass(frozen=True)
class VolumeMount:
    """A volume resolved for a machine: its image file, where and how it is mounted."""

    name: str
    path: Path
    target: str
    readonly: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "target": self.target,
                "readonly": self.readonly}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VolumeMount:
        return cls(str(d["name"]), Path(d["path"]), str(d["target"]), bool(d["readonly"]))

    @property
    def lock_path(self) -> Path:
        return self.path.parent / LOCK


def parse_volume_flag(text: str, *, cwd: str | None = None) -> VolumeRequest | ShareMount:
    """``NAME:/path`` (a volume) or ``HOSTDIR:/path`` (a share, ``volumes/shares.py``),
    then optionally ``:ro`` (or ``:rw``).

    Raises:
        VolumeError: malformed, a bad name or target, a host directory that is not one.
    """
    from ember.volumes.shares import ShareError, is_host_path, share

    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise VolumeError(f"-v {text!r}: use NAME:/PATH or HOSTDIR:/PATH, then :ro if wanted")
    name, target = parts[0], parts[1]
    mode = parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise VolumeError(f"-v {text!r}: the mode must be ro or rw, not {mode!r}")
    if is_host_path(name):
        try:
            return share(name, target, mode == "ro", cwd=cwd)
        except ShareError as exc:
            raise VolumeError(f"-v {text!r}: {exc}") from None
    return validated(VolumeRequest(name, target, mode == "ro"))


def check_target(target: str) -> str:
    """A guest mount path, normalised. Raises VolumeError."""
    norm = os.path.normpath(target)
    if not TARGET_RE.fullmatch(norm) or norm == "/" or ".." in norm.split("/"):
        raise VolumeError(f"invalid mount path {target!r}: an absolute path other than /, "
                          "of letters, digits, '.', '_', '-' and '/'")
    return norm


def validated(req: VolumeRequest) -> VolumeRequest:
    if not NAME_RE.fullmatch(req.name):
        raise VolumeError(f"invalid volume name {req.name!r}: letters, digits, '_', '.', "
                          "'-', starting with a letter or digit")
    return VolumeRequest(req.name, check_target(req.target), req.readonly)


def check_mounts(mounts: tuple[VolumeMount, ...], shares: tuple[ShareMount, ...] = ()) -> None:
    """Raises VolumeError when a machine's volumes and shares cannot go together."""
    from ember.volumes.shares import MAX_PER_MACHINE as MAX_SHARES
    from ember.volumes.shares import cmdline_param as shares_cmdline

    if len(mounts) > MAX_PER_MACHINE:
        raise VolumeError(f"at most {MAX_PER_MACHINE} volumes per machine, not {len(mounts)}")
    if len(shares) > MAX_SHARES:
        raise VolumeError(f"at most {MAX_SHARES} shares per machine, not {len(shares)}")
    names = [m.name for m in mounts]
    targets = [m.target for m in mounts] + [s.target for s in shares]
    for what, values in (("volume", names), ("mount path", targets)):
        dup = {v for v in values if values.count(v) > 1}
        if dup:
            raise VolumeError(f"{what} {sorted(dup)[0]} is given twice")
    for t in targets:
        outer = [o for o in targets if t.startswith(o + "/")]
        if outer:
            raise VolumeError(f"mount path {t} is inside mount path {outer[0]}: mount paths "
                              "cannot nest")
    if len(cmdline_param(mounts)) + len(shares_cmdline(shares)) > CMDLINE_MAX // 2:
        raise VolumeError("the mount paths are too long together (they travel on the "
                          "kernel command line): use fewer or shorter ones")


@dataclass(frozen=True)
class Volume:
    name: str
    dir: Path
    size: int
    created: str

    @property
    def path(self) -> Path:
        return self.dir / IMAGE

    def in_use(self) -> bool:
        """Whether a running machine's QEMU holds the volume's lock."""
        try:
            fd = try_lock(self.dir / LOCK)
        except FileNotFoundError:
            return False
        if fd is None:
            return True
        os.close(fd)
        return False

    def disk_bytes(self) -> int:
        """What the sparse image takes on the host's disk."""
        try:
            return os.stat(self.path).st_blocks * 512
        except OSError:
            return 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size_bytes": self.size, "disk_bytes": self.disk_bytes(),
                "created_at": self.created, "in_use": self.in_use(), "path": str(self.path)}


class VolumeStore:
    """The volumes of one data dir."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def create(self, name: str, size: int = DEFAULT_SIZE) -> Volume:
        """Make a volume: a sparse image of ``size`` bytes with an empty ext4.

        Raises:
            VolumeError: a bad name or size; VolumeExists: the name is taken.
        """
        validated(VolumeRequest(name, "/x"))
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise VolumeError(f"a volume's size must be between {MIN_SIZE >> 20} MiB and "
                              f"{MAX_SIZE >> 40} TiB, not {size} bytes")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self.root / name
        if final.exists():
            raise VolumeExists(f"volume {name} exists already")
        tmp = self.root / f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}"
        tmp.mkdir(mode=0o700)
        try:
            make_ext4(tmp / IMAGE, size, name[:16])
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            (tmp / META).write_text(json.dumps({"name": name, "size_bytes": size,
                                                "created_at": created}) + "\n")
            (tmp / LOCK).touch()
            try:
                os.rename(tmp, final)  # fails if the name was taken meanwhile
            except OSError:
                raise VolumeExists(f"volume {name} exists already") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(name)

    def get(self, name: str) -> Volume:
        """Raises VolumeNotFound."""
        if not NAME_RE.fullmatch(name):
            raise VolumeNotFound(f"no volume named {name!r}")
        d = self.root / name
        try:
            meta = json.loads((d / META).read_text())
            return Volume(name, d, int(meta["size_bytes"]), str(meta["created_at"]))
        except (OSError, ValueError, KeyError):
            raise VolumeNotFound(f"no volume named {name!r}") from None

    def list(self) -> list[Volume]:
        if not self.root.exists():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith("."):
                continue
            try:
                out.append(self.get(d.name))
            except VolumeNotFound:
                continue
        return out

    def remove(self, name: str) -> None:
        """Delete a volume and its data.

        Raises:
            VolumeNotFound; VolumeInUse: a running machine has it.
        """
        vol = self.get(name)
        fd = try_lock(vol.dir / LOCK, create=True)
        if fd is None:
            raise VolumeInUse(f"volume {name} is in use by a running machine")
        try:
            gone = self.root / f".rm-{name}-{time.monotonic_ns()}"
            os.rename(vol.dir, gone)  # under the lock: no machine can take it meanwhile
        finally:
            os.close(fd)
        shutil.rmtree(gone, ignore_errors=True)

    def mount(self, req: VolumeRequest) -> VolumeMount:
        """Resolve a request for a machine. Raises VolumeNotFound."""
        vol = self.get(req.name)
        return VolumeMount(vol.name, vol.path, req.target, req.readonly)


def make_ext4(path: Path, size: int, label: str) -> None:
    """A new sparse file of ``size`` bytes (mode 0600) holding an empty ext4.

    Raises:
        VolumeError: mkfs.ext4 is missing or failed (``path`` may be left: the caller
            made it under a temporary name).
    """
    mkfs = shutil.which("mkfs.ext4")
    if mkfs is None:
        raise VolumeError("mkfs.ext4 is not installed (e2fsprogs; run `ember setup`)")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as f:
        f.truncate(size)
    proc = subprocess.run([mkfs, "-q", "-F", "-L", label, "-E",
                           "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
                           str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise VolumeError(f"mkfs.ext4 failed: {proc.stderr.strip()}")


def hold(mount: VolumeMount) -> int:
    """Take the volume's lock for a machine about to start: the descriptor (QEMU inherits it).

    Raises:
        VolumeInUse: another running machine has it; VolumeNotFound: it is gone.
    """
    try:
        fd = try_lock(mount.lock_path)
    except FileNotFoundError:
        raise VolumeNotFound(f"no volume named {mount.name!r}") from None
    if fd is None:
        raise VolumeInUse(f"volume {mount.name} is in use by another running machine")
    return fd


def cmdline_param(mounts: tuple[VolumeMount, ...]) -> str:
    """``ember.volumes=0:/data:rw,1:/logs:ro``: the SCSI LUNs and their paths."""
    if not mounts:
        return ""
    parts = [f"{i}:{m.target}:{'ro' if m.readonly else 'rw'}" for i, m in enumerate(mounts)]
    return "ember.volumes=" + ",".join(parts)
