"""The agent protocol's framing and messages (pure Python, property-based)."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.agent.protocol import (
    MAX_PAYLOAD,
    ErrorInfo,
    ExecRequest,
    ExitStatus,
    Frame,
    FrameDecoder,
    FrameType,
    ReadyInfo,
    encode_frame,
    json_frame,
    json_payload,
)
from ember.errors import AgentError, ProtocolError

frames = st.builds(
    Frame,
    type=st.sampled_from(list(FrameType)),
    channel=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=300),
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


@given(st.lists(frames, max_size=20), st.lists(st.integers(0, 1 << 16), max_size=30))
def test_frames_round_trip_in_any_chunking(fs: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(f) for f in fs)
    dec = FrameDecoder()
    got: list[Frame] = []
    for chunk in split_at(stream, cuts):
        got += dec.feed(chunk)
    assert got == fs
    assert dec.buffered == 0


@given(frames, st.data())
def test_a_truncated_frame_yields_nothing_and_no_error(f: Frame, data: st.DataObject) -> None:
    raw = encode_frame(f)
    n = data.draw(st.integers(0, len(raw) - 1))
    dec = FrameDecoder()
    assert dec.feed(raw[:n]) == []
    assert dec.buffered == n
    assert dec.feed(raw[n:]) == [f]


@given(st.integers(5 + MAX_PAYLOAD + 1, 0xFFFFFFFF), st.sampled_from(list(FrameType)))
def test_an_oversized_length_is_rejected_from_the_header_alone(length: int,
                                                               t: FrameType) -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="length"):
        dec.feed(struct.pack(">IB", length, t))
    assert dec.buffered == 0


@given(st.integers(0, 4))
def test_a_length_below_5_is_rejected(length: int) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">IBI", length, FrameType.READY, 0))


@given(st.integers(0, 255).filter(lambda t: t not in {int(x) for x in FrameType}))
def test_an_unknown_type_is_rejected(t: int) -> None:
    with pytest.raises(ProtocolError, match="unknown frame type"):
        FrameDecoder().feed(struct.pack(">IB", 5, t))


def test_the_largest_frame_is_accepted() -> None:
    f = Frame(FrameType.STDOUT, 7, b"x" * MAX_PAYLOAD)
    assert FrameDecoder().feed(encode_frame(f)) == [f]


@settings(max_examples=50)
@given(st.binary(min_size=5, max_size=200))
def test_garbage_never_hangs_or_crashes_the_decoder(junk: bytes) -> None:
    dec = FrameDecoder()
    try:
        dec.feed(junk)
    except ProtocolError:
        return
    assert dec.buffered <= len(junk)


def test_a_failed_decoder_stays_failed() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(b"\xff\xff\xff\xff\x21")
    with pytest.raises(ProtocolError):
        dec.feed(encode_frame(Frame(FrameType.READY, 0, b"{}")))


def test_encode_rejects_what_the_wire_cannot_carry() -> None:
    with pytest.raises(ValueError):
        encode_frame(Frame(FrameType.STDIN, 1, b"x" * (MAX_PAYLOAD + 1)))
    with pytest.raises(ValueError):
        encode_frame(Frame(FrameType.STDIN, 1 << 32, b""))
    assert encode_frame(Frame(FrameType.HELLO, 0, b"{}")) == b"\0\0\0\x07\x01\0\0\0\0{}"


def test_json_payload_validates() -> None:
    assert json_payload(json_frame(FrameType.READY, 0, {"a": 1})) == {"a": 1}
    for bad in (b"[1]", b"\xff\xfe", b"{", b"", b"null", b'"x"'):
        with pytest.raises(ProtocolError):
            json_payload(Frame(FrameType.EXIT, 1, bad))
    with pytest.raises(ProtocolError):
        json_payload(Frame(FrameType.EXIT, 1, b"[" * 100000))


def test_exec_request_payload() -> None:
    req = ExecRequest(["echo", "hé"], env=["A=1"], cwd="/tmp", user="1:2", tty=True,
                      stdin=False, rows=10, cols=20)
    assert json.loads(req.to_payload()) == {
        "argv": ["echo", "hé"], "env": ["A=1"], "cwd": "/tmp", "user": "1:2",
        "tty": True, "stdin": False, "rows": 10, "cols": 20}
    with pytest.raises(ValueError):
        ExecRequest([])
    with pytest.raises(ValueError):
        ExecRequest(["a\0b"])
    with pytest.raises(ValueError):
        ExecRequest(["a"], env=["NOEQUALS"])
    with pytest.raises(TypeError):
        ExecRequest("ls")
    with pytest.raises(ValueError):
        ExecRequest(["a"], rows=0)


def test_exit_status() -> None:
    assert ExitStatus(code=3).exit_code == 3
    assert ExitStatus(signal=15).exit_code == 143
    assert str(ExitStatus(signal=9)) == "killed by signal 9"
    assert str(ExitStatus(code=0)) == "exited with code 0"
    assert ExitStatus.from_payload({"code": 42}) == ExitStatus(code=42)
    assert ExitStatus.from_payload({"signal": 9, "x": 1}) == ExitStatus(signal=9)
    for bad in ({}, {"code": 1, "signal": 2}, {"code": "1"}, {"code": True}, {"code": 256},
                {"signal": 0}):
        with pytest.raises(ProtocolError):
            ExitStatus.from_payload(bad)


def test_ready_and_error_info() -> None:
    info = ReadyInfo.from_payload({"version": 1, "agent": "a", "kernel": "k",
                                   "uptime_ms": 5, "new": True})
    assert (info.version, info.agent, info.kernel, info.uptime_ms) == (1, "a", "k", 5)
    with pytest.raises(ProtocolError):
        ReadyInfo.from_payload({"agent": "a"})
    with pytest.raises(ProtocolError):
        ReadyInfo.from_payload({"version": "1"})
    assert ErrorInfo.from_payload({"message": "m", "code": 127}) == ErrorInfo("m", 127)
    with pytest.raises(ProtocolError):
        ErrorInfo.from_payload({"code": 1})


def test_protocol_error_is_an_agent_error() -> None:
    assert issubclass(ProtocolError, AgentError)
