"""What the CLI reads and writes without a daemon: --filter, --format, --since, signals."""

from __future__ import annotations

import argparse
import signal
from datetime import UTC, datetime
from typing import Any

import pytest

from ember.api.models import Machine
from ember.cli.logs import parse_since
from ember.cli.ps import MachineView, matches, parse_filters, render
from ember.errors import EmberError
from ember.util import parse_signal


def machine(**fields: Any) -> MachineView:
    doc: dict[str, Any] = {
        "id": "0123456789abcdef", "name": "web", "image": "sample:latest",
        "image_id": "sha256:" + "ab" * 32, "state": "running", "cpus": 1, "memory_mib": 256,
        "env": {}, "cmd": ["httpd", "-f"], "entrypoint": None, "workdir": None, "user": None,
        "hostname": "web", "network": "user", "restart": "no", "created_at": "2026-12-01T08:00:00Z",
        "ports": [{"guest_port": 80, "host_port": 8080, "host_ip": "127.0.0.1",
                   "protocol": "tcp"}]}
    # what the daemon sends: the API model's JSON
    return MachineView(Machine.model_validate(doc | fields).model_dump(mode="json"))


def test_filters_same_key_or_different_keys_and() -> None:
    web, job = machine(), machine(name="job", state="stopped", exit_code=1, id="fedcba")
    f = parse_filters(["name=we", "name=jo"])
    assert matches(web, f) and matches(job, f)
    f = parse_filters(["name=we", "status=stopped"])
    assert not matches(web, f) and not matches(job, f)
    assert matches(job, parse_filters(["status=exited"]))  # Docker's word for stopped
    assert matches(web, parse_filters(["id=0123"])) and not matches(job, parse_filters(["id=0"]))
    assert matches(web, parse_filters(["ancestor=sample:latest"]))
    assert matches(web, parse_filters(["ancestor=abab"]))
    with pytest.raises(EmberError, match="expected KEY=VALUE"):
        parse_filters(["label=x"])
    with pytest.raises(EmberError, match="expected KEY=VALUE"):
        parse_filters(["name"])


def test_format_uses_dockers_field_names() -> None:
    m = machine(state="stopped", exit_code=3, ports=[])
    assert render("{{.Names}}\\t{{ .ID }} {{.Status}}", m) == "web\t0123456789ab stopped (3)"
    assert render("{{.Image}}|{{.Command}}|{{.State}}|{{.ExitCode}}", m) == \
        "sample:latest|httpd -f|stopped|3"
    assert render("{{.Ports}}", machine()) == "127.0.0.1:8080->80/tcp"
    with pytest.raises(EmberError, match=r"unknown field \.Labels"):
        render("{{.Labels}}", m)


def test_since_takes_durations_unix_times_and_rfc3339() -> None:
    now = 1_800_000_000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("1h30m", now) == now - 5400
    assert parse_since("1.5s", now) == now - 1.5
    assert parse_since("1764578400", now) == 1764578400.0
    assert parse_since("2026-12-01T08:00:00Z", now) == \
        datetime(2026, 12, 1, 8, tzinfo=UTC).timestamp()
    for bad in ("yesterday", "10x", "m10", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a time"):
            parse_since(bad, now)


def test_signals_by_name_or_number() -> None:
    assert parse_signal("SIGTERM") == parse_signal("term") == parse_signal("15") == 15
    assert parse_signal("KILL") == signal.SIGKILL and parse_signal(9) == 9
    for bad in ("SIGNOPE", "0", "65", "SIG_DFL", "-1"):
        with pytest.raises(ValueError):
            parse_signal(bad)


def test_the_command_table_names_every_command_of_every_group() -> None:
    """``ember CMD`` builds only CMD's group parser: the table must match the groups."""
    import importlib

    from ember.cli import COMMANDS, GROUPS, _command_of
    from ember.cli.common import Parser

    registered: dict[str, str] = {}
    for group in GROUPS:
        p = Parser(prog="ember")
        sub = p.add_subparsers()
        importlib.import_module(f"ember.cli.{group}").register(sub)
        registered.update(dict.fromkeys(sub.choices, group))
    assert registered == COMMANDS
    assert _command_of(["-v", "run", "--cpus", "2", "img"]) == "run"
    assert _command_of(["--version"]) is None
    assert _command_of(["bogus"]) is None


def test_completion_offers_commands_options_and_nothing_after_the_separator(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.cli.completion import candidates

    monkeypatch.setenv("EMBER_HOME", str(tmp_path))  # no daemon there: no names, no start
    top = candidates([""], 1)
    assert {"run", "ps", "exec", "pull", "stats", "completion"} <= set(top)
    assert not [c for c in top if c.startswith("_")]
    assert "--cpus" in candidates(["run", "--c"], 2)
    assert {"ls", "rm", "import"} <= set(candidates(["image", ""], 2))
    assert candidates(["run", "--cpus", ""], 3) == []  # the option's value
    assert candidates(["exec", "web", "--", ""], 4) == []
    assert candidates(["exec", ""], 2) == []  # machine names, but no daemon runs
    assert not (tmp_path / "daemon.pid").exists()
