"""Ember: micro virtual machines from OCI images, on QEMU's microvm machine.

``ember.Client`` and ``ember.AsyncClient`` (the SDK, :mod:`ember.sdk`) are
imported on first use, so ``import ember`` (and ``ember run``) stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client", "__version__"]

if TYPE_CHECKING:
    from ember.sdk import AsyncClient, Client


def __getattr__(name: str) -> Any:
    if name in ("Client", "AsyncClient"):
        import ember.sdk

        return getattr(ember.sdk, name)
    raise AttributeError(f"module 'ember' has no attribute {name!r}")
