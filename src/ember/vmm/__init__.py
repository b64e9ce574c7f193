"""The virtual machine monitor layer: the only package that knows QEMU's flags.

Its names are imported on first use: the API's models need only ``vmm/spec.py``'s
limits, not the process supervisor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember.vmm.network import PortMapping, PortUnavailable, parse_port
    from ember.vmm.process import VMProcess
    from ember.vmm.spec import DriveSpec, MachineSpec

_WHERE = {"PortMapping": "ember.vmm.network", "PortUnavailable": "ember.vmm.network",
          "parse_port": "ember.vmm.network", "VMProcess": "ember.vmm.process",
          "DriveSpec": "ember.vmm.spec", "MachineSpec": "ember.vmm.spec"}

__all__ = ["DriveSpec", "MachineSpec", "PortMapping", "PortUnavailable", "VMProcess", "parse_port"]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'ember.vmm' has no attribute {name!r}")
    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value
