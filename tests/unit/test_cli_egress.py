"""``--egress`` on ``run``/``create`` and ``ember update``, in-process and without a daemon
or a VM: what is sent, and one ``ember: error:`` line with status 125 for what is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember import cli
from ember.cli import wire
from ember.run import RunRequest
from ember.vmm.egress import EgressPolicy

MACHINE = {
    "id": "abc123def456", "name": "web", "image": "sample:latest", "image_id": "sha256:00",
    "state": "created", "cpus": 1, "memory_mib": 256, "env": {}, "cmd": None,
    "entrypoint": None, "workdir": None, "user": None, "hostname": "web", "network": "user",
    "ports": [], "restart": "no", "created_at": "2024-01-01T00:00:00Z",
}


def ember(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str) -> str:
    assert code == 125, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ember: error: "), err
    return lines[0]


@pytest.fixture
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_HOST", "http://127.0.0.1:1")


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Request]:
    """The SDK client of the CLI, answering from a script; the requests it sent."""
    from ember.sdk import Client

    sent: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        request.read()
        sent.append(request)
        if request.method == "POST" and request.url.path == "/v1/machines":
            body = json.loads(request.content)
            return httpx.Response(201, json={**MACHINE, "egress": body.get("egress")})
        if request.url.path.endswith("/start"):
            return httpx.Response(200, json={**MACHINE, "state": "running"})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})

    def client() -> Client:
        return Client(base_url="http://ember.test", transport=httpx.MockTransport(handle))

    monkeypatch.setenv("EMBER_HOST", "http://127.0.0.1:1")  # never a real daemon
    monkeypatch.setattr("ember.cli.machine.client", client)  # create
    monkeypatch.setattr("ember.cli.common.client", client)  # run -d
    return sent


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, Any]]:
    """``Wire.call`` recorded (``ember update`` takes the lean path)."""
    calls: list[tuple[str, str, Any]] = []

    def call(self: wire.Wire, method: str, path: str, body: Any = None,
             **_: Any) -> dict[str, Any]:
        calls.append((method, path, body))
        return {**MACHINE, "egress": body["egress"]}

    monkeypatch.setenv("EMBER_HOST", "http://127.0.0.1:1")
    monkeypatch.setattr(wire.Wire, "call", call)
    return calls


# ------------------------------------------------------------- bad values


@pytest.mark.parametrize(("args", "message"), [
    (["--egress", "1.1.1.1"], "--egress '1.1.1.1': use allow=RULE,... or deny=RULE,..."),
    (["--egress", "permit=1.1.1.1"], "use allow=RULE,... or deny=RULE,..."),
    (["--egress", "allow=::1"], "egress rule '::1': IPv6 is not supported"),
    (["--egress", "allow=1.1.1.1", "--egress", "deny=1.1.1.1:99999"],
     "egress rule '1.1.1.1:99999': the port must be between 1 and 65535"),
    (["--egress", "allow=300.1.1.1"], "egress rule '300.1.1.1'"),
    (["--egress", "allow=,"], "--egress: no rules given"),
])
@pytest.mark.parametrize("command", [["run"], ["run", "-d"], ["create"]])
def test_bad_egress_is_one_line_and_125_before_anything_starts(
        capsys: pytest.CaptureFixture[str], no_daemon: None, command: list[str],
        args: list[str], message: str) -> None:
    code, out, err = ember([*command, *args, "sample:latest"], capsys)
    assert message in one_line(code, err) and out == ""


@pytest.mark.parametrize(("args", "message"), [
    (["update", "web"], "nothing to update: give --egress SPEC or --egress-clear"),
    (["update", "web", "--egress", "allow=1.1.1.1", "--egress-clear"],
     "--egress and --egress-clear exclude each other"),
    (["update", "web", "--egress", "deny=::/0"], "egress rule '::/0': IPv6"),
    (["update", "web", "--egress", "allow="], "--egress: no rules given"),
    (["update", "web", "--egress", "bogus"], "use allow=RULE,... or deny=RULE,..."),
])
def test_bad_updates_are_one_line_and_125(capsys: pytest.CaptureFixture[str], no_daemon: None,
                                          args: list[str], message: str) -> None:
    code, out, err = ember(args, capsys)
    assert message in one_line(code, err) and out == ""


def test_update_needs_a_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["update", "--egress-clear"])
    err = capsys.readouterr().err
    assert "the following arguments are required: NAME" in one_line(int(str(info.value)), err)


# ------------------------------------------------------------- what is sent


def test_update_patches_the_policy_or_clears_it(capsys: pytest.CaptureFixture[str],
                                                patched: list[tuple[str, str, Any]]) -> None:
    code, out, _ = ember(["update", "web", "--egress", "allow=1.1.1.1:53,10.1.2.3/8",
                          "--egress", "deny=10.9.0.0/16"], capsys)
    assert code == 0 and out == "web\n"
    code, out, _ = ember(["update", "--egress-clear", "web"], capsys)
    assert code == 0 and out == "web\n"
    code, out, _ = ember(["update", "--json", "--egress", "deny=1.1.1.1", "web"], capsys)
    assert code == 0 and json.loads(out)["egress"] == {"allow": [], "deny": ["1.1.1.1/32"]}
    assert patched == [
        ("PATCH", "/v1/machines/web", {"egress": {"allow": ["1.1.1.1/32:53", "10.0.0.0/8"],
                                                  "deny": ["10.9.0.0/16"]}}),
        ("PATCH", "/v1/machines/web", {"egress": None}),
        ("PATCH", "/v1/machines/web", {"egress": {"allow": [], "deny": ["1.1.1.1/32"]}}),
    ]


@pytest.mark.parametrize("command", [["create"], ["run", "-d"]])
def test_create_and_run_detached_send_the_policy(capsys: pytest.CaptureFixture[str],
                                                 daemon: list[httpx.Request],
                                                 command: list[str]) -> None:
    code, out, err = ember([*command, "--pull", "never", "--egress", "allow=1.1.1.1:443",
                            "--egress", "deny=1.1.1.1:25", "sample:latest"], capsys)
    assert code == 0 and out == "web\n", err
    (create,) = [r for r in daemon if r.method == "POST" and r.url.path == "/v1/machines"]
    assert json.loads(create.content)["egress"] == {"allow": ["1.1.1.1/32:443"],
                                                    "deny": ["1.1.1.1/32:25"]}


def test_create_without_egress_sends_none(capsys: pytest.CaptureFixture[str],
                                          daemon: list[httpx.Request]) -> None:
    code, _, err = ember(["create", "--pull", "never", "sample:latest"], capsys)
    assert code == 0, err
    assert "egress" not in json.loads(daemon[0].content)


def test_run_in_the_foreground_boots_with_the_policy(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        no_daemon: None, tmp_path: Path) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    asked: list[RunRequest] = []

    def run(req: RunRequest, *_: Any, **__: Any) -> int:
        asked.append(req)
        return 0

    monkeypatch.setattr("ember.run.run", run)
    code, _, err = ember(["run", "--egress", "allow=1.1.1.1", "sample:latest", "true"], capsys)
    assert code == 0, err
    assert asked[0].egress == EgressPolicy.from_json({"allow": ["1.1.1.1"]})
    code, _, err = ember(["run", "--cold", "sample:latest", "true"], capsys)  # --cold: no
    # QEMU started ahead from a plan (the test's run() would never take it)
    assert code == 0 and asked[1].egress is None, err


def test_run_with_a_policy_is_never_started_ahead() -> None:
    """A QEMU spawned from a plan has no policy: a run with one is not speculated."""
    import argparse

    from ember.cli.run import _speculate

    args = argparse.Namespace(cold=False, from_snapshot=None, name=None, publish=[],
                              egress=["allow=1.1.1.1"], image="sample:latest")
    assert _speculate(args) == (None, None)


def test_a_foreground_policy_needs_the_tap_network(monkeypatch: pytest.MonkeyPatch) -> None:
    from ember import run
    from ember.errors import EmberError

    with pytest.raises(EmberError, match="with network none the guest reaches nothing"):
        run._check_egress("none")
    monkeypatch.setattr("ember.vmm.network.default_backend", lambda: "slirp")
    with pytest.raises(EmberError, match=r"^egress policies need the tap network .* slirp"):
        run._check_egress("user")
    monkeypatch.setattr("ember.vmm.network.default_backend", lambda: "tap")
    run._check_egress("user")


def test_update_is_a_command_of_the_machine_group() -> None:
    assert cli.COMMANDS["update"] == "machine"
    parser = cli._parser("update")
    args = parser.parse_args(["update", "web", "--egress", "allow=1.1.1.1",
                              "--egress", "deny=2.2.2.2"])
    assert args.egress == ["allow=1.1.1.1", "deny=2.2.2.2"] and not args.egress_clear
