"""The host side of the guest agent's protocol (see docs/agent-protocol.md)."""

from ember.agent.client import AgentClient, ExecFailed, Process, ProcessTimeout
from ember.agent.protocol import (
    MAX_PAYLOAD,
    ExecRequest,
    ExitStatus,
    Frame,
    FrameDecoder,
    FrameType,
    ReadyInfo,
    encode_frame,
)

__all__ = [
    "MAX_PAYLOAD",
    "AgentClient",
    "ExecFailed",
    "ExecRequest",
    "ExitStatus",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Process",
    "ProcessTimeout",
    "ReadyInfo",
    "encode_frame",
]
