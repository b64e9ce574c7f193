"""The CLI as a user meets it: exit statuses and one-line errors (no VM needed)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from images_helpers import file, layer_tar, symlink, write_docker_archive, write_oci_layout


def ember(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EMBER_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 125, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ember: error: "), proc.stderr
    return lines[0]


def hostile_layouts(tmp: Path) -> dict[str, Path]:
    cases: dict[str, Path] = {}
    cases["dotdot"] = write_oci_layout(tmp / "dotdot", [[file("../../escape", b"x")]], {})
    cases["absolute"] = write_oci_layout(tmp / "absolute", [[file("/etc/evil", b"x")]], {})
    cases["symlink"] = write_oci_layout(
        tmp / "symlink", [[symlink("up", "../../.."), file("up/escape", b"x")]], {})
    truncated = tmp / "truncated.tar"
    whole = write_docker_archive(tmp / "whole.tar", [[file("a", b"a" * 50000)]], {})
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    cases["truncated"] = truncated
    garbage = tmp / "garbage.tar"
    garbage.write_bytes(b"this is not a tar archive at all" * 100)
    cases["garbage"] = garbage
    # a docker-save whose layer does not match the config's diff_id
    good = write_docker_archive(tmp / "good.tar", [[file("a", b"a")]], {})
    bad = tmp / "mismatch.tar"
    with tarfile.open(good) as src, tarfile.open(bad, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            if m.name.endswith("layer.tar") and data is not None:
                data = layer_tar([file("a", b"tampered")])
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    cases["mismatch"] = bad
    return cases


def test_hostile_and_malformed_images_get_one_line_and_store_is_untouched(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    good = write_oci_layout(tmp_path / "ok", [[file("hello", b"hi")]], {"Cmd": ["/hello"]})
    assert ember("image", "import", "-q", str(good), "--tag", "ok:1", home=home).returncode == 0
    before = tree(home)
    for name, path in hostile_layouts(tmp_path / "cases").items():
        line = one_line_error(ember("image", "import", "-q", str(path), home=home))
        assert "Traceback" not in line, name
        assert tree(home) == before, f"{name} left something in the store"
    listing = json.loads(ember("image", "ls", "--json", home=home).stdout)
    assert [i["tags"] for i in listing] == [["ok:1"]]
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()


def test_run_with_a_hostile_path_fails_before_booting(tmp_path: Path) -> None:
    bad = write_oci_layout(tmp_path / "bad", [[file("../x", b"x")]], {"Cmd": ["/x"]})
    line = one_line_error(ember("run", "-q", str(bad), home=tmp_path / "home"))
    assert "../x" in line


def test_image_ls_rm_and_missing_refs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    layout = write_oci_layout(tmp_path / "l", [[file("f", b"1")]], {})
    image_id = ember("image", "import", "-q", str(layout), "--tag", "a:1", home=home).stdout.strip()
    assert image_id.startswith("sha256:")
    assert "a:1" in ember("image", "ls", home=home).stdout
    info = json.loads(ember("image", "inspect", "a:1", home=home).stdout)
    assert info["id"] == image_id and info["tags"] == ["a:1"] and len(info["layers"]) == 1
    assert Path(info["rootfs"]).is_file()
    assert ember("image", "rm", "a:1", home=home).returncode == 0
    proc = ember("image", "rm", "a:1", home=home)
    assert proc.returncode == 1 and proc.stderr.startswith("ember: error:")


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--cpus", "x", "img"], "argument --cpus: 'x' is not a whole number"),
    (["run", "-m", "lots", "img"], "argument -m/--memory: 'lots' is not a size"),
    (["run", "--accel", "hvf", "img"], "argument --accel: invalid choice: 'hvf'"),
    (["run"], "the following arguments are required: IMAGE"),
    (["ps", "--bogus"], "unrecognized arguments: --bogus"),
    (["nosuchcommand"], "argument COMMAND: invalid choice: 'nosuchcommand'"),
    (["kill", "-s", "SIGNOPE", "web"], "unknown signal 'SIGNOPE'"),
])
def test_bad_flags_are_one_line_and_125_naming_the_help(tmp_path: Path, args: list[str],
                                                        message: str) -> None:
    line = one_line_error(ember(*args, home=tmp_path))
    assert message in line and "--help`)" in line and "usage:" not in line


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--cpus", "0", "img"], "cpus: 0 is not between 1 and 64"),
    (["run", "--cpus", "999", "img"], "cpus: 999 is not between 1 and 64"),
    (["run", "--cpus", str((os.cpu_count() or 1) + 1), "img"], "more than the host's"),
    (["run", "-m", "200g", "img"], "MiB is more than the host's"),
    (["run", "-m", "32", "img"], "memory: 32 MiB is not between 64"),
    (["run", "--restart", "always", "img"], "--restart is for machines under the daemon"),
    (["run", "--rm", "--restart", "always", "-d", "img"], "--rm and --restart exclude"),
    (["run", "--name", "bad name", "img"], "invalid machine name 'bad name'"),
    (["run", "-d", "--accel", "tcg", "img"], "the daemon chooses the accelerator"),
])
def test_run_checks_the_machine_before_anything_else(tmp_path: Path, args: list[str],
                                                     message: str) -> None:
    """The same check for the foreground and the daemon path, before an image is looked
    up or QEMU started (a daemon is never reached: EMBER_HOST points nowhere)."""
    env = {"EMBER_HOST": "http://127.0.0.1:1"}
    proc = subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True,
                          text=True, env={**os.environ, "EMBER_HOME": str(tmp_path), **env},
                          timeout=120, stdin=subprocess.DEVNULL)
    assert message in one_line_error(proc)


def test_a_command_group_alone_shows_its_help(tmp_path: Path) -> None:
    proc = ember("image", home=tmp_path)
    assert proc.returncode == 0 and "usage: ember image" in proc.stdout
    proc = ember(home=tmp_path)
    assert proc.returncode == 0 and "usage: ember" in proc.stdout


@pytest.mark.parametrize("name", ["bad name", "x ember.root=/dev/vdb", "-lead", "a" * 64, "é"])
def test_hostnames_that_could_reach_the_kernel_command_line_are_refused(
        tmp_path: Path, name: str) -> None:
    from ember.errors import EmberError
    from ember.machine import MachineConfig

    with pytest.raises(EmberError, match="invalid hostname"):
        MachineConfig(hostname=name)
    assert MachineConfig(hostname="web-1.local").hostname == "web-1.local"


@pytest.mark.parametrize(("args", "message"), [
    (["-p", "99999:80"], "host port 99999 is not between 1 and 65535"),
    (["-p", "80:http"], "guest port 'http' is not a number"),
    (["-p", "8080:80/udp"], "only tcp ports can be published"),
    (["--network", "none", "-p", "80"], "ports cannot be published with network none"),
])
def test_bad_published_ports_fail_before_booting(tmp_path: Path, args: list[str],
                                                 message: str) -> None:
    proc = ember("run", *args, "sample", "--", "true", home=tmp_path)
    assert message in one_line_error(proc)
