"""Machine states the daemon's modules share."""

from __future__ import annotations

ACTIVE = ("starting", "running", "paused", "stopping")
"""States in which a machine has (or is getting, or is losing) a QEMU."""
