"""``ember volume`` and ``-v``: parsing, without a daemon."""

from __future__ import annotations

import argparse

import pytest

from ember.cli import COMMANDS, _parser, main
from ember.cli.common import parse_size
from ember.cli.machine import volume_specs
from ember.cli.volume import human_size
from ember.volumes.store import VolumeRequest


@pytest.mark.parametrize(("text", "want"), [
    ("1048576", 1 << 20), ("16M", 16 << 20), ("16m", 16 << 20), ("10G", 10 << 30),
    ("10GiB", 10 << 30), ("10gb", 10 << 30), ("2T", 2 << 40), ("512K", 512 << 10),
    ("1k", 1024),
])
def test_sizes_take_binary_suffixes(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "G", "1.5G", "-1G", "10X", "١٠G"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_volume_create_parses_size() -> None:
    args = _parser("volume").parse_args(["volume", "create", "data", "--size", "1G"])
    assert args.name == "data" and args.size == 1 << 30
    assert _parser("volume").parse_args(["volume", "create", "d"]).size is None
    args = _parser("volume").parse_args(["volume", "rm", "a", "b"])
    assert args.names == ["a", "b"]
    args = _parser("volume").parse_args(["volume", "ls", "-q"])
    assert args.quiet and not args.json
    assert COMMANDS["volume"] == "volume"


@pytest.mark.parametrize("size", ["1M", "17T", "lots"])
def test_volume_create_refuses_sizes_out_of_range(size: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["volume", "create", "x", "--size", size])
    assert info.value.code == 125
    err = capsys.readouterr().err
    assert err.startswith("ember: error:") and err.count("\n") == 1


@pytest.mark.parametrize("command", ["run", "create"])
def test_v_is_repeatable_on_run_and_create(command: str) -> None:
    args = _parser(command).parse_args(
        [command, "-v", "data:/data", "--volume", "logs:/var/log:ro", "sample:latest"])
    assert args.volume == [VolumeRequest("data", "/data"),
                           VolumeRequest("logs", "/var/log", True)]
    assert volume_specs(args) == [{"name": "data", "target": "/data", "readonly": False},
                                  {"name": "logs", "target": "/var/log", "readonly": True}]
    assert _parser(command).parse_args([command, "sample:latest"]).volume == []


def test_top_level_v_is_still_verbose() -> None:
    args = _parser("run").parse_args(["-v", "run", "sample:latest"])
    assert args.verbose and args.volume == []


@pytest.mark.parametrize(("value", "match"), [
    ("/nonexistent-ember-dir/data:/data", "does not exist"), ("data", "NAME:/PATH"),
    ("data:/", "mount path"), ("data:/d:rx", "mode"),
])
def test_bad_v_is_one_error_line(value: str, match: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "-v", value, "sample:latest"])
    assert info.value.code == 125
    err = capsys.readouterr().err
    assert err.startswith("ember: error:") and match in err and err.count("\n") == 1


def test_a_run_with_volumes_has_no_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.cli import run as cli_run

    args = _parser("run").parse_args(["run", "-v", "data:/data", "sample:latest"])
    assert cli_run._speculate(args) == (None, None)


def test_human_size_is_binary() -> None:
    assert human_size(10 << 30) == "10G"
    assert human_size(1536 << 20) == "1.5G"
    assert human_size(100) == "100B"
    assert human_size(16 << 20) == "16M"
