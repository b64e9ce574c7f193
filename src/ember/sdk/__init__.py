"""The Python SDK: drive the Ember daemon from code.

    import ember

    with ember.Client.connect_or_start() as client:
        with client.machines.create("sample:latest", cmd=["sleep", "600"]) as m:
            print(m.exec(["echo", "hi"]).stdout)

See docs/sdk.md. Results are the API's models (``ember.api.models``); errors
derive from :class:`ember.errors.EmberError` (see :mod:`ember.sdk.errors`).
"""

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

__all__ = [
    "APIError", "AsyncClient", "AsyncImages", "AsyncMachineHandle", "AsyncMachines", "Client",
    "Conflict", "DaemonUnavailable", "ExecEvent", "ExecSession", "Images", "InvalidRequest",
    "MachineHandle", "Machines", "NotFound", "Unauthorized", "parse_port",
]
