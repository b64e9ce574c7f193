"""What this host can do: QEMU, the accelerator to use, and why.

Accelerator choice. KVM is the right accelerator wherever it can run an
unmodified guest kernel. Some hosts expose a ``/dev/kvm`` that cannot: a
cloud VM without nested virtualisation may run KVM's *PVM* flavour
(``/sys/module/kvm_pvm``), which executes guest user mode natively but
emulates every guest-kernel instruction, and an unmodified Linux hangs under
it (XRSTOR emulation failures, then ``int3_selftest``). There QEMU's software
CPU (TCG) is the only thing that works, so ``auto`` picks TCG and says why.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache

from ember.errors import HostError

ACCELS = ("auto", "kvm", "tcg")
QEMU_BINARY = "qemu-system-x86_64"


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator Ember will use (``kvm`` or ``tcg``) and the reason, for humans."""

    name: str
    reason: str


def kvm_status() -> tuple[bool, str]:
    """Whether KVM can run an unmodified guest here, with the reason either way."""
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist (no KVM module, or not exposed to this host)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user"
    if os.path.exists("/sys/module/kvm_pvm"):
        return False, ("host KVM is the PVM implementation (/sys/module/kvm_pvm), "
                       "which cannot run an unmodified guest kernel")
    return True, "/dev/kvm is usable (hardware virtualisation)"


def choose_accel(requested: str | None = None) -> AccelChoice:
    """Pick the accelerator: ``requested`` (or ``$EMBER_ACCEL``), else automatic.

    Raises:
        HostError: an unknown name, or ``kvm`` asked for where KVM is unusable.
    """
    want = (requested or os.environ.get("EMBER_ACCEL") or "auto").lower()
    if want not in ACCELS:
        raise HostError(f"unknown accelerator {want!r}: choose one of {', '.join(ACCELS)}")
    ok, why = kvm_status()
    if want == "tcg":
        return AccelChoice("tcg", "requested (software CPU)")
    if want == "kvm":
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise HostError(f"--accel kvm: {why}")
        return AccelChoice("kvm", "requested" + ("" if ok else f" (warning: {why})"))
    if ok:
        return AccelChoice("kvm", why)
    return AccelChoice("tcg", f"{why}; using QEMU's software CPU")


def qemu_path() -> str | None:
    return shutil.which(QEMU_BINARY)


@cache
def qemu_version() -> str | None:
    """QEMU's version string ("7.2.19"), or None when QEMU is not installed."""
    path = qemu_path()
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\S+)", out)
    return m.group(1) if m else out.strip()


def require_qemu() -> str:
    path = qemu_path()
    if path is None:
        raise HostError(f"{QEMU_BINARY} is not installed: run `ember setup` "
                        "(Debian package qemu-system-x86)")
    return path


def free_disk_bytes(path: str) -> int:
    while not os.path.exists(path):
        path = os.path.dirname(path) or "/"
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
