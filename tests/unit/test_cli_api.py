"""The daemon-backed CLI commands without a daemon: argument parsing, one-line errors,
safe copies onto the host."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

from ember import cli
from ember.cli import common, cp, ps
from ember.cli import exec as cli_exec
from ember.errors import EmberError
from ember.files import UnsafeArchive
from ember.sdk import ExecEvent, InvalidRequest, parse_port


def ember(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``ember ARGS`` in-process."""
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the CLI at a TCP port where nothing listens (loopback): never start one."""
    monkeypatch.setenv("EMBER_HOST", "http://127.0.0.1:1")


def one_line(code: int, err: str) -> str:
    assert code == 125, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ember: error: "), err
    return lines[0]


# ------------------------------------------------------------- -p


@pytest.mark.parametrize(("text", "expected"), [
    ("8080:80", ("127.0.0.1", 8080, 80)),
    ("0.0.0.0:8080:80", ("0.0.0.0", 8080, 80)),
    ("80", ("127.0.0.1", 0, 80)),
    (":80", ("127.0.0.1", 0, 80)),
    ("::80", ("127.0.0.1", 0, 80)),
    ("8080:80/tcp", ("127.0.0.1", 8080, 80)),
    (" 9000:90 ", ("127.0.0.1", 9000, 90)),
])
def test_publish_syntax(text: str, expected: tuple[str, int, int]) -> None:
    p = parse_port(text)
    assert (p.host_ip, p.host_port, p.guest_port) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty port mapping"),
    ("0", "guest port '0'"),
    ("70000:80", "host port '70000'"),
    ("a:80", "host port 'a'"),
    ("80/udp", "only tcp"),
    ("1:2:3:4", "IP:HOST:GUEST"),
    ("::1:80:80", "IP:HOST:GUEST"),
    ("999.1.1.1:80:80", "not an IPv4"),
])
def test_bad_publish_values_say_why(text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        parse_port(text)


def test_bad_publish_is_one_line_and_125(capsys: pytest.CaptureFixture[str],
                                         no_daemon: None) -> None:
    code, out, err = ember(["create", "-p", "80:99999", "sample:latest"], capsys)
    assert "guest port '99999'" in one_line(code, err) and out == ""


# ------------------------------------------------------------- other options


def test_memory_env_and_entrypoint_options() -> None:
    assert [common.parse_memory(v) for v in ("512", "512m", "2g", "1GiB", "64MB")] == \
        [512, 512, 2048, 1024, 64]
    with pytest.raises(argparse.ArgumentTypeError):
        common.parse_memory("lots")
    assert common.parse_env(["A=1", "B", "C", "D=x=y", "E="], {"B": "from-host"}) == \
        {"A": "1", "B": "from-host", "D": "x=y", "E": ""}
    with pytest.raises(EmberError, match="NAME=VALUE"):
        common.parse_env(["=x"], {})
    assert common.entrypoint_arg(None) is None
    assert common.entrypoint_arg("") == []
    assert common.entrypoint_arg("/bin/sh") == ["/bin/sh"]


def test_exec_without_a_command_is_one_line(capsys: pytest.CaptureFixture[str],
                                            no_daemon: None) -> None:
    code, _, err = ember(["exec", "web", "--"], capsys)
    assert "needs a command" in one_line(code, err)


def test_an_unreachable_daemon_is_one_line(capsys: pytest.CaptureFixture[str],
                                           no_daemon: None) -> None:
    code, _, err = ember(["ps"], capsys)
    assert "cannot reach the ember daemon at http://127.0.0.1:1" in one_line(code, err)


def test_exec_exits_with_the_commands_status_or_says_why_it_could_not_run(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_exec._exit_status(ExecEvent("exit", exit_code=3)) == 3
    assert cli_exec._exit_status(ExecEvent("exit", exit_code=137, signal=9)) == 137
    assert cli_exec._exit_status(ExecEvent("error", exit_code=127,
                                          message="nosuch: command not found")) == 127
    assert capsys.readouterr().err == "ember: error: nosuch: command not found\n"
    with pytest.raises(EmberError, match="before the process exited"):
        cli_exec._exit_status(None)


# ------------------------------------------------------------- cp


@pytest.mark.parametrize(("arg", "expected"), [
    ("web:/etc/hosts", ("web", "/etc/hosts")),
    ("web:etc", ("web", "etc")),
    ("my.box-1:/", ("my.box-1", "/")),
    ("./web:/x", (None, "./web:/x")),
    ("/abs/path", (None, "/abs/path")),
    ("file.txt", (None, "file.txt")),
    ("dir/a:b", (None, "dir/a:b")),
    ("-", (None, "-")),
    ("~/x", (None, "~/x")),
])
def test_cp_arguments(arg: str, expected: tuple[str | None, str]) -> None:
    assert cp.parse_cp_arg(arg) == expected


@pytest.mark.parametrize(("args", "message"), [
    (["a.txt", "b.txt"], "one of SRC and DST must be a machine path"),
    (["web:/a", "db:/b"], "between machines"),
    (["web:", "."], "machine path is empty"),
])
def test_bad_cp_arguments_are_one_line(args: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str],
                                       no_daemon: None) -> None:
    code, _, err = ember(["cp", *args], capsys)
    assert message in one_line(code, err)


def tar_of(*entries: tuple[str, bytes | None, str]) -> bytes:
    """(name, data, kind) with kind file, dir, symlink (data = target) or chr."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, (data or b"").decode()
                tf.addfile(info)
            elif kind == "chr":
                info.type = tarfile.CHRTYPE
                tf.addfile(info)
            else:
                info.size = len(data or b"")
                tf.addfile(info, io.BytesIO(data or b""))
    return buf.getvalue()


def test_copy_from_guest_into_a_dir_or_as_a_new_name(tmp_path: Path) -> None:
    archive = tar_of(("conf", b"v=1\n", "file"))
    cp.copy_from_guest(archive, "/etc/conf", str(tmp_path))
    assert (tmp_path / "conf").read_bytes() == b"v=1\n"
    cp.copy_from_guest(archive, "/etc/conf", str(tmp_path / "renamed"))
    assert (tmp_path / "renamed").read_bytes() == b"v=1\n"
    (tmp_path / "renamed").write_bytes(b"old")
    cp.copy_from_guest(archive, "/etc/conf", str(tmp_path / "renamed"))
    assert (tmp_path / "renamed").read_bytes() == b"v=1\n"
    tree = tar_of(("app", None, "dir"), ("app/x", b"x", "file"))
    cp.copy_from_guest(tree, "/srv/app", str(tmp_path / "copy"))
    assert (tmp_path / "copy" / "x").read_bytes() == b"x"
    assert sorted(os.listdir(tmp_path)) == ["conf", "copy", "renamed"]  # no temp dir left
    with pytest.raises(EmberError, match="does not exist"):
        cp.copy_from_guest(archive, "/etc/conf", str(tmp_path / "nodir") + "/")


@pytest.mark.parametrize("entries", [
    [("../escape", b"x", "file")],
    [("/etc/evil", b"x", "file")],
    [("dev", None, "chr")],
    [("up", b"../..", "symlink"), ("up/escape", b"x", "file")],
], ids=["dotdot", "absolute", "device", "through-symlink"])
def test_copy_from_guest_refuses_hostile_archives(
        tmp_path: Path, entries: list[tuple[str, bytes | None, str]]) -> None:
    dest = tmp_path / "a" / "b" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(UnsafeArchive):
        cp.copy_from_guest(tar_of(*entries), "/x", str(dest))
    # nothing outside dest; inside, at most the symlink (made as docker cp makes it)
    assert [p for p in tmp_path.rglob("*") if p.is_file() or p.is_char_device()] == []
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) in (
        ["a", "a/b", "a/b/dest"], ["a", "a/b", "a/b/dest", "a/b/dest/up"])


def test_host_tar_names_the_entry_and_gives_it_to_root(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("hi")
    with tarfile.open(fileobj=io.BytesIO(cp.host_tar(tmp_path / "d", "target"))) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert set(members) == {"target", "target/f"}
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "root" for m in members.values())


def test_ps_ages_read_like_docker() -> None:
    from datetime import UTC, datetime

    now = datetime(2024, 1, 2, 0, 0, 0, tzinfo=UTC)
    assert ps._ago("2024-01-01T23:59:58Z", now) == "just now"
    assert ps._ago("2024-01-01T23:59:30+00:00", now) == "30 seconds ago"
    assert ps._ago("2024-01-01T23:58:00Z", now) == "2 minutes ago"
    assert ps._ago("2024-01-01T00:00:00Z", now) == "1 day ago"


def test_version_without_a_daemon_says_so_and_starts_none(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    from ember import __version__

    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EMBER_HOST", raising=False)
    code, out, err = ember(["version"], capsys)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"client: ember {__version__}, API v1, Python {sys.version.split()[0]}",
        f"daemon: not running (nothing answers at {tmp_path / 'home' / 'ember.sock'})"]
    code, out, _ = ember(["version", "--json"], capsys)
    assert code == 0 and json.loads(out) == {
        "client": {"version": __version__, "api": "v1", "python": sys.version.split()[0]},
        "daemon": None}
    assert not (tmp_path / "home").exists()  # no daemon was started for it


def test_version_with_an_unreachable_tcp_daemon_is_one_line(
        capsys: pytest.CaptureFixture[str], no_daemon: None) -> None:
    code, out, err = ember(["version"], capsys)
    assert out.startswith("client: ember ")
    assert "cannot reach the ember daemon at http://127.0.0.1:1" in one_line(code, err)
