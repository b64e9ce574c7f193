"""A cpio (newc) writer and the guest initramfs built from the agent.

The kernel unpacks the initramfs before it runs ``/init``. Writing the archive
ourselves (rather than calling ``cpio``) lets it hold ``/dev/console`` as a
character device without root, and keeps it byte-for-byte reproducible (all
mtimes 0, fixed inode numbers), so its hash is a stable cache key.

The archive is left uncompressed: under TCG the guest CPU is slow and a
gzip'd initramfs costs more to inflate than the few hundred kilobytes cost
to load.
"""

from __future__ import annotations

import fcntl
import hashlib
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ember.util import atomic_write

_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``mode`` includes the file type bits (``stat.S_IFDIR | 0o755``)."""

    name: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0
    uid: int = 0
    gid: int = 0


def _header(ino: int, e: CpioEntry, namesize: int, filesize: int) -> bytes:
    fields = [
        ino, e.mode, e.uid, e.gid, 1, 0, filesize,
        0, 0, e.rdev_major, e.rdev_minor, namesize, 0,
    ]
    return b"070701" + b"".join(f"{v:08X}".encode() for v in fields)


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def write_cpio(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise entries as a newc archive, ending with the trailer."""
    out = bytearray()
    ino = 1
    for e in [*entries, CpioEntry(_TRAILER, 0)]:
        name = e.name.lstrip("/").encode() + b"\0"
        data = e.data if stat.S_ISREG(e.mode) or stat.S_ISLNK(e.mode) else b""
        hdr = _header(ino if e.name != _TRAILER else 0, e, len(name), len(data))
        out += hdr + name
        out += _pad4(len(hdr) + len(name))
        out += data + _pad4(len(data))
        ino += 1
    return bytes(out)


def guest_entries(init_binary: bytes) -> list[CpioEntry]:
    """The initramfs of every Ember guest: the agent as ``/init`` and its mount points."""
    d = stat.S_IFDIR | 0o755
    return [
        CpioEntry("dev", d),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1),
        CpioEntry("proc", d),
        CpioEntry("sys", d),
        CpioEntry("ember", d),
        CpioEntry("ember/lower", d),
        CpioEntry("ember/rw", d),
        CpioEntry("ember/root", d),
        CpioEntry("init", stat.S_IFREG | 0o755, data=init_binary),
    ]


def initramfs_path(init_binary: Path, cache_dir: Path, name: str = "initramfs") -> Path:
    """Where the initramfs for ``init_binary`` is cached: keyed by that binary's hash."""
    key = hashlib.sha256(init_binary.read_bytes()).hexdigest()[:16]
    return cache_dir / "initramfs" / f"{name}-{key}.cpio"


def ensure_initramfs(init_binary: Path, cache_dir: Path, name: str = "initramfs") -> Path:
    """The cached initramfs whose ``/init`` is ``init_binary`` (built if missing)."""
    path = initramfs_path(init_binary, cache_dir, name)
    if path.is_file():
        return path
    blob = init_binary.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():
            atomic_write(path, write_cpio(guest_entries(blob)))
    return path
