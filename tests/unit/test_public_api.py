"""The names other layers (and, later, the API and SDK) build on: a change here is deliberate."""

from __future__ import annotations

import ember
import ember.agent
import ember.images
import ember.sdk
import ember.vmm


def test_images_public_names() -> None:
    assert {"ImageStore", "Image", "ImageConfig", "ProcessSpec", "resolve_process",
            "normalize_tag", "human_size"} <= set(ember.images.__all__)


def test_agent_public_names() -> None:
    assert {"AgentClient", "Process", "ExecFailed", "ExecRequest", "ExitStatus",
            "ReadyInfo"} <= set(ember.agent.__all__)


def test_vmm_public_names() -> None:
    assert set(ember.vmm.__all__) == {"DriveSpec", "MachineSpec", "PortMapping",
                                    "PortUnavailable", "VMProcess", "parse_port"}


def test_sdk_public_names() -> None:
    assert set(ember.sdk.__all__) == {
        "Client", "AsyncClient", "Images", "Machines", "MachineHandle", "AsyncImages",
        "AsyncMachines", "AsyncMachineHandle", "ExecEvent", "ExecSession", "parse_port",
        "APIError", "NotFound", "Conflict", "InvalidRequest", "Unauthorized",
        "DaemonUnavailable"}
    assert ember.Client is ember.sdk.Client and ember.AsyncClient is ember.sdk.AsyncClient
    assert issubclass(ember.sdk.APIError, ember.errors.EmberError)
    assert issubclass(ember.sdk.DaemonUnavailable, ember.errors.EmberError)


def test_every_public_name_exists() -> None:
    for module in (ember, ember.agent, ember.images, ember.sdk, ember.vmm):
        for name in module.__all__:
            assert hasattr(module, name), f"{module.__name__}.{name}"
