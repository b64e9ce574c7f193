"""The guest bundle: kernel + initramfs (with the agent as /init), built once, cached."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ember.guest.agent import build_agent, build_poweroff
from ember.guest.initramfs import ensure_initramfs
from ember.guest.kernel import ensure_kernel
from ember.util import Progress, no_progress


@dataclass(frozen=True)
class GuestBundle:
    kernel: Path
    initramfs: Path


def ensure_guest(cache_dir: Path, progress: Progress = no_progress) -> GuestBundle:
    """Kernel and agent initramfs, building whichever is missing (progress shown)."""
    kernel = ensure_kernel(cache_dir, progress)
    agent = build_agent(cache_dir, progress)
    return GuestBundle(kernel.vmlinux, ensure_initramfs(agent, cache_dir, "agent"))


def ensure_baseline_guest(cache_dir: Path, progress: Progress = no_progress) -> GuestBundle:
    """The benchmark's floor: the same kernel, an init that powers off at once."""
    kernel = ensure_kernel(cache_dir, progress)
    init = build_poweroff(cache_dir, progress)
    return GuestBundle(kernel.vmlinux, ensure_initramfs(init, cache_dir, "poweroff"))
