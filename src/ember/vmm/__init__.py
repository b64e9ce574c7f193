"""The virtual machine monitor layer: the only package that knows QEMU's flags.

Its names are imported on first use: the API's models need only ``vmm/spec.py``'s
limits, not the process supervisor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember.lazy import lazy_getattr

if TYPE_CHECKING:
    from ember.vmm.network import PortMapping, PortUnavailable, parse_port
    from ember.vmm.process import VMProcess
    from ember.vmm.spec import DriveSpec, MachineSpec

_WHERE = {"PortMapping": "ember.vmm.network", "PortUnavailable": "ember.vmm.network",
          "parse_port": "ember.vmm.network", "VMProcess": "ember.vmm.process",
          "DriveSpec": "ember.vmm.spec", "MachineSpec": "ember.vmm.spec"}

__all__ = ["DriveSpec", "MachineSpec", "PortMapping", "PortUnavailable", "VMProcess", "parse_port"]


__getattr__ = lazy_getattr(__name__, _WHERE, globals())
