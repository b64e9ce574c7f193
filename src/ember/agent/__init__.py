"""The host side of the guest agent's protocol (see docs/agent-protocol.md)."""

from ember.agent.client import AgentClient, ExecFailed, Process, ProcessTimeout
from ember.agent.protocol import (
    MAX_PAYLOAD,
    MAX_TOOL_SIZE,
    ExecRequest,
    ExitStatus,
    Frame,
    FrameDecoder,
    FrameType,
    ReadyInfo,
    ToolStatus,
    encode_frame,
)

__all__ = [
    "MAX_PAYLOAD",
    "MAX_TOOL_SIZE",
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
    "ToolStatus",
    "encode_frame",
]
