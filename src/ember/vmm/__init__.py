"""The virtual machine monitor layer: the only package that knows QEMU's flags."""

from ember.vmm.network import PortMapping, PortUnavailable, parse_port
from ember.vmm.process import VMProcess
from ember.vmm.spec import DriveSpec, MachineSpec

__all__ = ["DriveSpec", "MachineSpec", "PortMapping", "PortUnavailable", "VMProcess", "parse_port"]
