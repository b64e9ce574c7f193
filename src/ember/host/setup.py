"""``ember setup``: install the host packages Ember needs, then build the guest bundle."""

from __future__ import annotations

import os
import shutil
import subprocess

from ember import paths
from ember.errors import HostError
from ember.util import Progress, no_progress

#: Debian packages Ember needs at run time and to build its guest artifacts.
PACKAGES = (
    "qemu-system-x86",      # the VMM
    "linux-source-6.1",     # guest kernel source
    "musl-tools",           # the guest agent is linked against musl: small and quick to exec
    "make", "gcc", "libc6-dev", "flex", "bison", "bc", "libelf-dev", "libssl-dev",
    "xz-utils", "cpio", "patch",  # kernel build
    "erofs-utils",          # read-only root filesystems
    "e2fsprogs",
    "busybox-static",       # the demo and test images; the tool file copies run in guests
    "bubblewrap",           # the VMM's jail (namespaces, its root); setpriv is util-linux's
    "nftables",             # the tap network's firewall and NAT (iproute2 makes the links)
    "iproute2",
)


def missing_packages() -> list[str]:
    """Packages of ``PACKAGES`` that dpkg does not report installed ([] where there is no dpkg)."""
    if shutil.which("dpkg-query") is None:
        return []
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *PACKAGES],
        capture_output=True, text=True,
    ).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    return [p for p in PACKAGES if p not in installed]


def apt_install(packages: list[str], progress: Progress) -> None:
    if not packages:
        return
    if shutil.which("apt-get") is None:
        raise HostError("missing packages and no apt-get to install them: "
                        + " ".join(packages))
    if os.geteuid() != 0:
        raise HostError("missing packages (run as root, or install them yourself): "
                        + " ".join(packages))
    progress(f"installing {len(packages)} Debian packages: {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise HostError(f"{' '.join(cmd[:2])} failed: {last}")


def setup(*, install_packages: bool = True, progress: Progress = no_progress) -> None:
    """Install what is missing and build (or find cached) kernel, agent and initramfs."""
    from ember.guest.bundle import ensure_guest, prune_guest_cache

    missing = missing_packages()
    if missing:
        if not install_packages:
            raise HostError("missing packages: " + " ".join(missing))
        apt_install(missing, progress)
    guest = ensure_guest(paths.cache_dir(), progress)
    progress(f"guest kernel {guest.kernel}")
    progress(f"guest initramfs {guest.initramfs}")
    stale = prune_guest_cache(paths.cache_dir())
    if stale:
        progress(f"removed {len(stale)} outdated guest builds from the cache")
