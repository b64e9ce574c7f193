"""Booting the sample image on a machine of the test's own, and stopping it: shared by tests."""

from __future__ import annotations

from ember import paths
from ember.guest.bundle import GuestBundle
from ember.host.probe import choose_accel
from ember.images import ImageStore
from ember.machine import Machine, MachineConfig


def boot(store: ImageStore, guest: GuestBundle, config: MachineConfig) -> Machine:
    """A started ``sample:latest`` machine of ``config`` (closed again if it fails to start)."""
    m = Machine.create(machines_dir=paths.machines_dir(), guest=guest,
                       rootfs=store.rootfs(store.resolve("sample:latest")),
                       accel=choose_accel(None), config=config)
    try:
        m.start()
    except BaseException:
        m.close()
        raise
    return m


def halt(m: Machine) -> None:
    """Shut the guest down cleanly, then release everything of the machine."""
    try:
        m.shutdown()
    finally:
        m.close()
