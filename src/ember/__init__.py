"""Ember: micro virtual machines from OCI images, on QEMU's microvm machine."""

__version__ = "0.1.0"
