"""Machine states the daemon's modules share."""

from __future__ import annotations

ACTIVE = ("starting", "running", "paused", "stopping")
"""States in which a machine has (or is getting, or is losing) a QEMU."""

STATES = ("created", "starting", "running", "paused", "stopping", "stopped", "crashed")
"""Every state a machine can be in (``api/models.py``'s MachineState)."""
