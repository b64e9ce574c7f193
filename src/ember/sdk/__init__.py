"""The Python SDK: drive the Ember daemon from code.

    import ember

    with ember.Client.connect_or_start() as client:
        with client.machines.create("sample:latest", cmd=["sleep", "600"]) as m:
            print(m.exec(["echo", "hi"]).stdout)

See docs/sdk.md. Results are the API's models (``ember.api.models``); errors
derive from :class:`ember.errors.EmberError` (see :mod:`ember.sdk.errors`).

The names below are imported on first use: a CLI command that only needs the
errors, or only the sync client, does not pay for the async one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember.lazy import lazy_getattr

if TYPE_CHECKING:
    from ember.sdk._common import ExecEvent, parse_port
    from ember.sdk.aio import AsyncClient, AsyncImages, AsyncMachineHandle, AsyncMachines
    from ember.sdk.client import Client, ExecSession, Images, MachineHandle, Machines
    from ember.sdk.errors import (
        APIError,
        Conflict,
        DaemonUnavailable,
        InvalidRequest,
        NotFound,
        Unauthorized,
    )

_WHERE = {
    **dict.fromkeys(("ExecEvent", "parse_port"), "ember.sdk._common"),
    **dict.fromkeys(("AsyncClient", "AsyncImages", "AsyncMachineHandle", "AsyncMachines"),
                    "ember.sdk.aio"),
    **dict.fromkeys(("Client", "ExecSession", "Images", "MachineHandle", "Machines"),
                    "ember.sdk.client"),
    **dict.fromkeys(("APIError", "Conflict", "DaemonUnavailable", "InvalidRequest", "NotFound",
                     "Unauthorized"), "ember.sdk.errors"),
}

__all__ = [
    "APIError", "AsyncClient", "AsyncImages", "AsyncMachineHandle", "AsyncMachines", "Client",
    "Conflict", "DaemonUnavailable", "ExecEvent", "ExecSession", "Images", "InvalidRequest",
    "MachineHandle", "Machines", "NotFound", "Unauthorized", "parse_port",
]


__getattr__ = lazy_getattr(__name__, _WHERE, globals())
