"""A snapshot's manifest: what it holds and what a machine restored from it must match.

The manifest is untrusted input (a snapshot directory can be edited, copied in
from elsewhere, or truncated by a crash): ``Manifest.from_json`` checks every
field's type and range, and ``check_compatible`` refuses, with one line saying
why, a snapshot this host cannot restore -- another QEMU build, accelerator,
CPU model or guest kernel -- before QEMU starts.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import EmberError

FORMAT_VERSION = 1
KINDS = ("user", "boot")
ID_RE = re.compile(r"[0-9a-f]{32}")
#: Snapshot tags: what Docker allows for names, like machine names.
TAG_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}")


class SnapshotError(EmberError):
    """A snapshot is malformed, missing, in use, or cannot be restored here."""


@dataclass(frozen=True)
class FileRef:
    """A file a snapshot depends on, identified by content (and, to check fast, by stat)."""

    path: str
    size: int
    sha256: str
    #: ``st_mtime_ns`` and ``st_ino`` when hashed: an unchanged stat spares a rehash.
    mtime_ns: int = 0
    inode: int = 0

    @classmethod
    def of(cls, path: Path) -> FileRef:
        st = path.stat()
        return cls(str(path), st.st_size, sha256_file(path), st.st_mtime_ns, st.st_ino)

    def check(self, what: str) -> None:
        """Raise ``SnapshotError`` unless the file is still there with the same content."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise SnapshotError(f"the snapshot needs its {what} {self.path}, which is gone "
                                f"({exc.strerror})") from None
        if st.st_size != self.size:
            raise SnapshotError(f"the snapshot's {what} {self.path} has changed (size)")
        if (st.st_mtime_ns, st.st_ino) == (self.mtime_ns, self.inode):
            return
        if sha256_file(Path(self.path)) != self.sha256:
            raise SnapshotError(f"the snapshot's {what} {self.path} has changed (content)")


@dataclass(frozen=True)
class Manifest:
    """Everything about one snapshot; written last, as ``manifest.json``."""

    id: str
    kind: str
    created: str
    #: QEMU's identity: its version and a hash of the binary (microvm state does
    #: not migrate across QEMU builds).
    qemu_version: str
    qemu_build: str
    accel: str
    cpu_model: str
    cpus: int
    memory_mib: int
    network: str
    devices: tuple[str, ...]
    kernel: FileRef
    initramfs: FileRef
    rootfs: FileRef
    cmdline: str
    #: The image: its id, the reference it was run by, and its run-time config
    #: (``Entrypoint``, ``Cmd``, ``Env``, ``WorkingDir``, ``User``: what a command
    #: given at a clone's start is resolved against).
    image_id: str
    image_ref: str
    image_config: dict[str, Any]
    #: The state file's size and hash (checked before every restore).
    state_size: int
    state_sha256: str
    #: The memory file's apparent size (the guest's RAM) and bytes allocated.
    memory_size: int
    memory_allocated: int
    size_on_disk: int
    pause_ms: float
    tag: str = ""
    #: The machine it was taken of ("" for a boot snapshot).
    parent: str = ""
    #: The machine's main process at snapshot time: its channel, so a clone started
    #: without a command follows it (0: none, e.g. a boot snapshot).
    main_channel: int = 0
    #: The hostname the template had (a clone gets its own).
    hostname: str = ""
    #: Boot snapshots: the key of the machine shape they are for.
    boot_key: str = ""
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["devices"] = list(self.devices)
        return d

    @classmethod
    def from_json(cls, obj: object, *, where: str = "manifest") -> Manifest:
        """Validate an untrusted manifest document.

        Raises:
            SnapshotError: anything missing, of the wrong type or out of range.
        """
        if not isinstance(obj, dict):
            raise SnapshotError(f"{where}: not a JSON object")
        v = _Validator(obj, where)
        fmt = v.integer("format", 1, 1 << 16)
        if fmt != FORMAT_VERSION:
            raise SnapshotError(f"{where}: format {fmt} is not one this Ember reads "
                                f"({FORMAT_VERSION})")
        m = cls(
            id=v.text("id", ID_RE), kind=v.choice("kind", KINDS), created=v.text("created"),
            qemu_version=v.text("qemu_version"), qemu_build=v.text("qemu_build"),
            accel=v.choice("accel", ("tcg", "kvm")), cpu_model=v.text("cpu_model"),
            cpus=v.integer("cpus", 1, 64), memory_mib=v.integer("memory_mib", 64, 256 * 1024),
            network=v.choice("network", ("user", "none")),
            devices=tuple(v.str_list("devices")),
            kernel=v.file("kernel"), initramfs=v.file("initramfs"), rootfs=v.file("rootfs"),
            cmdline=v.text("cmdline"), image_id=v.text("image_id"), image_ref=v.text("image_ref"),
            image_config=v.mapping("image_config"),
            state_size=v.integer("state_size", 1, 1 << 32), state_sha256=v.text("state_sha256",
                                                                             _HEX64),
            memory_size=v.integer("memory_size", 1, 1 << 40),
            memory_allocated=v.integer("memory_allocated", 0, 1 << 40),
            size_on_disk=v.integer("size_on_disk", 0, 1 << 42),
            pause_ms=v.number("pause_ms"),
            tag=v.text("tag", TAG_RE, optional=True), parent=v.text("parent", optional=True),
            main_channel=v.integer("main_channel", 0, (1 << 32) - 1, optional=True),
            hostname=v.text("hostname", optional=True), boot_key=v.text("boot_key", optional=True),
        )
        if m.memory_size != m.memory_mib << 20:
            raise SnapshotError(f"{where}: memory_size does not match memory_mib")
        return m


_HEX64 = re.compile(r"[0-9a-f]{64}")


class _Validator:
    def __init__(self, obj: dict[str, Any], where: str) -> None:
        self.obj = obj
        self.where = where

    def _get(self, key: str, kind: type | tuple[type, ...], optional: bool) -> Any:
        value = self.obj.get(key)
        if value is None:
            if optional:
                return None
            raise SnapshotError(f"{self.where}: {key!r} is missing")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise SnapshotError(f"{self.where}: {key!r} has the wrong type")
        return value

    def text(self, key: str, pattern: re.Pattern[str] | None = None, *,
            optional: bool = False) -> str:
        value = self._get(key, str, optional)
        if value is None or (optional and value == ""):
            return ""
        if len(value) > 4096 or "\0" in value or (pattern and not pattern.fullmatch(value)):
            raise SnapshotError(f"{self.where}: {key!r} is malformed")
        return str(value)

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.text(key)
        if value not in choices:
            raise SnapshotError(f"{self.where}: {key!r} must be one of {', '.join(choices)}")
        return value

    def integer(self, key: str, lo: int, hi: int, *, optional: bool = False) -> int:
        value = self._get(key, int, optional)
        if value is None:
            return 0
        if not lo <= value <= hi:
            raise SnapshotError(f"{self.where}: {key!r} = {value} is out of range")
        return int(value)

    def number(self, key: str) -> float:
        value = self._get(key, (int, float), False)
        if isinstance(value, bool) or not 0 <= value < 1e9:
            raise SnapshotError(f"{self.where}: {key!r} is out of range")
        return float(value)

    def str_list(self, key: str) -> list[str]:
        value = self._get(key, list, False)
        if len(value) > 64 or not all(isinstance(x, str) and len(x) < 256 for x in value):
            raise SnapshotError(f"{self.where}: {key!r} is malformed")
        return list(value)

    def mapping(self, key: str) -> dict[str, Any]:
        return dict(self._get(key, dict, False))

    def file(self, key: str) -> FileRef:
        sub = _Validator(self._get(key, dict, False), f"{self.where}: {key}")
        return FileRef(path=sub.text("path"), size=sub.integer("size", 0, 1 << 42),
                       sha256=sub.text("sha256", _HEX64),
                       mtime_ns=sub.integer("mtime_ns", 0, 1 << 63, optional=True),
                       inode=sub.integer("inode", 0, 1 << 63, optional=True))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
