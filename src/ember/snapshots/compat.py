"""What a snapshot is tied to on this host: the QEMU build, the accelerator, the CPU model.

microvm device state does not migrate across QEMU builds, a TCG snapshot does
not restore under KVM (nor the reverse), and under KVM the guest saw the host
CPU's features. ``host_identity`` names all three cheaply: the QEMU binary is
hashed once per (path, size, mtime, inode) and the answer cached on disk, so a
warm start pays a ``stat``, not a 20 MB hash or a ``qemu --version``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ember.errors import HostError
from ember.host.probe import qemu_path
from ember.snapshots.manifest import Manifest, SnapshotError, sha256_file


@dataclass(frozen=True)
class HostIdentity:
    qemu_version: str
    qemu_build: str
    accel: str
    cpu_model: str


def host_identity(accel: str, cache_dir: Path) -> HostIdentity:
    """QEMU's version and build hash, and the CPU model a guest sees under ``accel``.

    Raises:
        HostError: QEMU is not installed.
    """
    path = qemu_path()
    if path is None:
        raise HostError("qemu-system-x86_64 is not installed: run `ember setup`")
    real = os.path.realpath(path)
    st = os.stat(real)
    key = hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode()
                         ).hexdigest()[:24]
    note = cache_dir / "host" / f"qemu-{key}.json"
    try:
        known = json.loads(note.read_text())
        version, build = str(known["version"]), str(known["build"])
    except (OSError, ValueError, KeyError, TypeError):
        from ember.host.probe import qemu_version

        version = qemu_version() or "unknown"
        build = sha256_file(Path(real))
        with contextlib.suppress(OSError):
            note.parent.mkdir(parents=True, exist_ok=True)
            tmp = note.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"version": version, "build": build}))
            os.replace(tmp, note)
    return HostIdentity(version, build, accel, cpu_model(accel))


def cpu_model(accel: str) -> str:
    """The CPU the guest sees: QEMU's default model under TCG; the host's under KVM."""
    if accel == "tcg":
        return "qemu64"
    name, flags = "unknown", ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        if m := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
            name = m.group(1).strip()
        if m := re.search(r"^flags\s*:\s*(.+)$", text, re.M):
            flags = hashlib.sha256(m.group(1).encode()).hexdigest()[:12]
    return f"host:{name}:{flags}"


def check_compatible(m: Manifest, host: HostIdentity) -> None:
    """Refuse, with one line saying why, a snapshot this host cannot restore.

    Raises:
        SnapshotError: another QEMU build, accelerator or CPU model.
    """
    what = f"snapshot {m.tag or m.short_id}"
    if m.accel != host.accel:
        raise SnapshotError(f"{what} was taken under {m.accel}, and this machine would run "
                            f"under {host.accel} (use --accel {m.accel})")
    if m.qemu_build != host.qemu_build:
        raise SnapshotError(f"{what} was taken with another QEMU build ({m.qemu_version}, "
                            f"build {m.qemu_build[:12]}; this host has {host.qemu_version}, "
                            f"build {host.qemu_build[:12]}): microvm state does not migrate "
                            "across QEMU builds")
    if m.cpu_model != host.cpu_model:
        raise SnapshotError(f"{what} was taken on another CPU model ({m.cpu_model}; this host: "
                            f"{host.cpu_model})")
