"""IDENTITY, the refresh a clone gets, with the real C agent in test mode.

In test mode the agent must not touch the host's clock, hostname or RNG: it
answers that nothing was reseeded, which the host client treats as a failure.
What can be checked without a guest is checked here (the request's validation,
READY's ``restored_from``); the refresh itself is checked in real clones
(tests/integration/test_snapshots.py).
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent_host import T, start_agent

import ember.guest.agent as agent_builder
from ember.agent.client import AgentClient
from ember.agent.protocol import FrameType, json_frame
from ember.errors import AgentError

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


@pytest.fixture(scope="module")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agent_builder.build_agent(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def client(agent_bin: Path) -> Iterator[AgentClient]:
    with start_agent(agent_bin) as r:
        c = AgentClient(r.sock)
        c.hello(T)
        yield c
        c.close()


def test_test_mode_leaves_the_host_alone_and_says_so(client: AgentClient) -> None:
    before = socket.gethostname()
    with pytest.raises(AgentError, match="could not reseed.*test mode"):
        client.identity(hostname="clone-1", snapshot="ab" * 16)
    assert socket.gethostname() == before
    # the agent now knows it is a clone of that snapshot, and says so on every HELLO
    assert client.hello(T).restored_from == "ab" * 16


@pytest.mark.parametrize("payload", [
    {"hostname": "-bad-"}, {"hostname": "a" * 64}, {"entropy": "xyz"},
    {"entropy": "00" * 513}, {"machine_id": "ABC"}, {"snapshot": "not hex!"},
    {"time_ns": -5}, {"hostname": 5},
])
def test_malformed_identity_is_refused(client: AgentClient, payload: dict[str, object]) -> None:
    client._identity_event.clear()
    client._send(json_frame(FrameType.IDENTITY, 0, payload))
    assert client._identity_event.wait(T)
    assert client.last_error is not None and "IDENTITY" in client.last_error.message
    assert client.hello(T).restored_from == ""  # nothing was applied


def test_hello_with_resend_returns_the_ready(client: AgentClient) -> None:
    assert client.hello(T, resend=0.05).version == 1
    # a resent HELLO's extra READY is harmless: the connection still works
    assert client.hello(T).version == 1
