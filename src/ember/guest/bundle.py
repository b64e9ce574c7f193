"""The guest bundle: kernel + initramfs (with the agent as /init), built once, cached."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.errors import EmberError
from ember.guest.agent import agent_path, build_agent, build_poweroff, poweroff_path
from ember.guest.initramfs import ensure_initramfs, initramfs_path
from ember.guest.kernel import ensure_kernel, kernel_artifact
from ember.host.tsc import host_tsc_khz
from ember.util import Progress, no_progress


@dataclass(frozen=True)
class GuestBundle:
    kernel: Path
    initramfs: Path
    #: The kernel's CONFIG_HZ (0 if unknown): the host states timer rates in jiffies.
    kernel_hz: int = 0
    #: The host's TSC rate in kHz (0 if unknown): stated to guests on a software CPU.
    tsc_khz: int = 0


def ensure_guest(cache_dir: Path, progress: Progress = no_progress) -> GuestBundle:
    """Kernel and agent initramfs, building whichever is missing (progress shown)."""
    kernel = ensure_kernel(cache_dir, progress)
    agent = build_agent(cache_dir, progress)
    return GuestBundle(kernel.vmlinux, ensure_initramfs(agent, cache_dir, "agent"), kernel.hz(),
                       host_tsc_khz(cache_dir))


def ensure_baseline_guest(cache_dir: Path, progress: Progress = no_progress) -> GuestBundle:
    """The benchmark's floor: the same kernel, an init that powers off at once."""
    kernel = ensure_kernel(cache_dir, progress)
    init = build_poweroff(cache_dir, progress)
    return GuestBundle(kernel.vmlinux, ensure_initramfs(init, cache_dir, "poweroff"), kernel.hz(),
                       host_tsc_khz(cache_dir))


def guest_status(cache_dir: Path) -> dict[str, dict[str, Any]]:
    """Where kernel, agent and initramfs are (or will be) and whether they are built.

    Builds nothing: for ``ember doctor``.
    """
    kernel = kernel_artifact(cache_dir)
    status: dict[str, dict[str, Any]] = {
        "kernel": {"path": str(kernel.vmlinux), "built": kernel.exists(), "key": kernel.key},
    }
    try:
        agent = agent_path(cache_dir)
    except EmberError as exc:
        status["agent"] = {"path": None, "built": False, "error": str(exc)}
        status["initramfs"] = {"path": None, "built": False}
        return status
    status["agent"] = {"path": str(agent), "built": agent.is_file()}
    if agent.is_file():
        initrd = initramfs_path(agent, cache_dir, "agent")
        status["initramfs"] = {"path": str(initrd), "built": initrd.is_file()}
    else:
        status["initramfs"] = {"path": str(cache_dir / "initramfs"), "built": False}
    return status


def prune_guest_cache(cache_dir: Path) -> list[Path]:
    """Delete cached kernels, agents and initramfs that the current sources no longer use.

    Every change of the fragment, a patch, the agent's source or the compiler
    leaves the old build behind; ``ember setup`` calls this after building, so
    the cache holds one of each. Entries being built (dot names) are left alone.
    """
    keep = {kernel_artifact(cache_dir).dir}
    for binary, name in ((agent_path(cache_dir), "agent"),
                         (poweroff_path(cache_dir), "poweroff")):
        keep.add(binary.parent)
        if binary.is_file():
            keep.add(initramfs_path(binary, cache_dir, name))
    removed = []
    for sub in ("kernel", "agent", "initramfs"):
        folder = cache_dir / sub
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(".") or entry in keep:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
