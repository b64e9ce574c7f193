"""The CLI as a user meets it: exit statuses and one-line errors (no VM needed).

``ember image`` goes through the daemon: those tests get a real one, started by
the CLI itself in the test's home (and stopped after it); machines are created,
never booted.
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from images_helpers import (
    file,
    layer_tar,
    symlink,
    tar_directory,
    write_docker_archive,
    write_oci_layout,
)


def ember(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EMBER_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)


def stop_daemon(home: Path) -> None:
    """Stop the daemon a CLI started for ``home``, if one did, and wait until it is gone."""
    try:
        pid = int((home / "daemon.pid").read_text())
        fd = os.pidfd_open(pid)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"EMBER_HOME={home}".encode() in environ:  # not a reused pid
            os.kill(pid, signal.SIGTERM)
            assert select.select([fd], [], [], 60)[0], f"daemon {pid} did not stop"
    except FileNotFoundError:
        pass
    finally:
        os.close(fd)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A data dir of the test's own; the daemon the CLI starts in it stops afterwards."""
    h = tmp_path / "home"
    yield h
    stop_daemon(h)


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One daemon for the image tests that do not need a store of their own."""
    h = tmp_path_factory.mktemp("shared") / "home"
    yield h
    stop_daemon(h)


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
        tmp_path: Path, home: Path) -> None:
    good = write_oci_layout(tmp_path / "ok", [[file("hello", b"hi")]], {"Cmd": ["/hello"]})
    assert ember("image", "import", "-q", str(good), "--tag", "ok:1", home=home).returncode == 0
    before = tree(home / "images")
    for name, path in hostile_layouts(tmp_path / "cases").items():
        line = one_line_error(ember("image", "import", "-q", str(path), home=home))
        assert "Traceback" not in line, name
        assert tree(home / "images") == before, f"{name} left something in the store"
    listing = json.loads(ember("image", "ls", "--json", home=home).stdout)
    assert [i["tags"] for i in listing] == [["ok:1"]]
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()


def test_run_with_a_hostile_path_fails_before_booting(tmp_path: Path) -> None:
    bad = write_oci_layout(tmp_path / "bad", [[file("../x", b"x")]], {"Cmd": ["/x"]})
    line = one_line_error(ember("run", "-q", str(bad), home=tmp_path / "home"))
    assert "../x" in line


def ok(*args: str, home: Path) -> str:
    proc = ember(*args, home=home)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_image_ls_inspect_rm_and_missing_refs(tmp_path: Path, shared_home: Path) -> None:
    home = shared_home
    layout = write_oci_layout(tmp_path / "l", [[file("f", b"1")]],
                              {"Cmd": ["/f"], "Labels": {"k": "v"}, "StopSignal": "SIGINT"})
    proc = ember("image", "import", str(layout), "--tag", "a:1", home=home)
    image_id = proc.stdout.strip()
    assert proc.returncode == 0 and image_id.startswith("sha256:")
    assert f"ember: importing {layout} (" in proc.stderr
    assert f"ember: imported {image_id[7:19]} as a:1" in proc.stderr
    assert "a:1" in ok("image", "ls", home=home)
    assert image_id[7:19] in ok("image", "ls", "-q", home=home).split()
    (info,) = json.loads(ok("image", "inspect", "a:1", home=home))
    assert info["id"] == image_id and info["tags"] == ["a:1"] and len(info["layers"]) == 1
    (layer,) = info["layers"]
    assert set(layer) == {"digest", "media_type", "size", "diff_id"}
    assert layer["digest"].startswith("sha256:") and layer["diff_id"].startswith("sha256:")
    assert info["manifest_digest"].startswith("sha256:")
    assert info["config"]["Labels"] == {"k": "v"} and info["config"]["StopSignal"] == "SIGINT"
    assert info["config"]["Cmd"] == ["/f"] and info["config"]["Entrypoint"] is None
    assert Path(info["rootfs"]).is_file()
    # several names: an array of those found, one line per missing one, and 125
    proc = ember("image", "inspect", "a:1", "ghost:1", image_id[7:10], home=home)
    assert proc.returncode == 125
    assert [i["id"] for i in json.loads(proc.stdout)] == [image_id, image_id]
    assert proc.stderr.splitlines() == ["ember: error: image 'ghost:1' not found (ember image "
                                        "ls lists the store; ember image import PATH adds an "
                                        "OCI layout or docker-save tar)"]
    assert "invalid image tag" in one_line_error(
        ember("image", "tag", info["id"], "Bad Tag", home=home))
    assert ok("image", "rm", "a:1", home=home) == f"Untagged: a:1\nDeleted: {image_id}\n"
    assert "not found" in one_line_error(ember("image", "rm", "a:1", home=home))
    assert "not found" in one_line_error(ember("image", "tag", "a:1", "b:1", home=home))
    assert "does not exist" in one_line_error(
        ember("image", "import", str(tmp_path / "nosuch"), home=home))


def test_image_rm_untags_and_an_image_a_machine_uses_stays(tmp_path: Path,
                                                         shared_home: Path) -> None:
    home = shared_home
    layout = write_oci_layout(tmp_path / "l", [[file("g", b"2")]], {"Cmd": ["/g"]})
    image_id = ok("image", "import", "-q", str(layout), "--tag", "app:1", home=home).strip()
    ok("image", "tag", "app:1", "app:2", home=home)
    assert ok("image", "ls", "--json", home=home).count(image_id) == 1
    # by id, with two tags: refused
    line = one_line_error(ember("image", "rm", image_id[7:19], home=home))
    assert "has 2 tags (app:1, app:2)" in line
    assert ok("image", "rm", "app:2", home=home) == "Untagged: app:2\n"
    ok("create", "--name", "uses-app", "app:1", home=home)
    line = one_line_error(ember("image", "rm", "app:1", home=home))
    assert "is used by machine uses-app" in line
    (info,) = json.loads(ok("image", "inspect", image_id, home=home))
    assert info["tags"] == ["app:1"]
    # forced: the tag goes, the image stays while the machine exists; prune leaves it
    assert ok("image", "rm", "-f", "app:1", home=home) == "Untagged: app:1\n"
    (info,) = json.loads(ok("image", "inspect", image_id, home=home))
    assert info["tags"] == [] and Path(info["rootfs"]).is_file()
    assert image_id not in ok("image", "prune", home=home)
    ok("rm", "uses-app", home=home)
    out = ok("image", "prune", home=home)
    assert f"Deleted: {image_id}\n" in out and "Total reclaimed space: " in out
    assert "not found" in one_line_error(ember("image", "inspect", image_id, home=home))


def test_an_import_that_takes_a_tag_says_so_and_prune_takes_the_old_image(
        tmp_path: Path, shared_home: Path) -> None:
    home = shared_home
    first = ok("image", "import", "-q",
               str(write_oci_layout(tmp_path / "a", [[file("a", b"a")]], {"Cmd": ["/a"]})),
               "--tag", "moving:1", home=home).strip()
    archive = write_docker_archive(tmp_path / "b.tar", [[file("b", b"b")]], {"Cmd": ["/b"]},
                                   repo_tags=["moving:1"])
    proc = ember("image", "import", "-q", str(archive), home=home)
    assert proc.returncode == 0, proc.stderr
    second = proc.stdout.strip()
    assert proc.stderr == f"ember: tag moving:1 moved from image {first[7:19]}\n"
    (old,) = json.loads(ok("image", "inspect", first, home=home))
    assert old["tags"] == []
    # `ember create PATH` imports through the daemon too, and says so as well
    again = write_oci_layout(tmp_path / "c", [[file("c", b"c")]], {"Cmd": ["/c"]},
                             ref_name="moving:1")
    proc = ember("create", "--name", "from-path", str(again), home=home)
    assert proc.returncode == 0, proc.stderr
    assert f"ember: tag moving:1 moved from image {second[7:19]}\n" in proc.stderr
    (m,) = json.loads(ok("ps", "-a", "--json", home=home))
    assert m["name"] == "from-path" and m["image"] == "moving:1"
    out = ok("image", "prune", home=home)
    assert f"Deleted: {first}\n" in out and f"Deleted: {second}\n" in out
    assert "moving:1" in ok("image", "ls", home=home)
    ok("rm", "from-path", home=home)


def test_image_prune_all_and_the_sample_image(tmp_path: Path, home: Path) -> None:
    used = ok("image", "import", "-q",
              str(write_oci_layout(tmp_path / "u", [[file("u", b"u")]], {"Cmd": ["/u"]})),
              "--tag", "used:1", home=home).strip()
    proc = ember("image", "sample", home=home)
    assert proc.returncode == 0, proc.stderr
    sample = proc.stdout.strip()
    assert "ember: imported " in proc.stderr and "as sample:latest" in proc.stderr
    (info,) = json.loads(ok("image", "inspect", "sample:latest", home=home))
    assert info["id"] == sample and info["config"]["Cmd"] == ["/app/hello.sh"]
    assert info["config"]["Entrypoint"] is None and info["config"]["User"] == "app"
    assert ok("image", "sample", "-q", "--tag", "other:1", home=home).strip() == sample
    ok("create", "--name", "holder", "used:1", home=home)
    out = ok("image", "prune", "-a", home=home)
    lines = out.splitlines()
    assert lines[:3] == ["Untagged: other:1", "Untagged: sample:latest", f"Deleted: {sample}"]
    assert lines[3].startswith("Total reclaimed space: ") and not lines[3].endswith(" 0 B")
    assert [i["tags"] for i in json.loads(ok("image", "ls", "--json", home=home))] == \
        [["used:1"]]
    assert ok("image", "prune", "-a", home=home) == "Total reclaimed space: 0 B\n"
    assert used in ok("image", "ls", "--json", home=home)


def test_image_import_uploads_to_a_daemon_over_tcp(tmp_path: Path, home: Path) -> None:
    """With EMBER_HOST the daemon may be elsewhere: directories and archives are sent."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "EMBER_HOME": str(home), "EMBER_TOKEN": "test-token"}
    serve = subprocess.Popen([sys.executable, "-m", "ember", "serve", "--tcp",
                              f"127.0.0.1:{port}", "--insecure-tcp"], env=env,
                             stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert serve.stderr is not None
        line = b""
        while b"listening" not in line:  # the daemon says where it listens
            line = serve.stderr.readline()
            assert line, "ember serve exited"
        tcp = {"EMBER_HOST": f"http://127.0.0.1:{port}", "EMBER_TOKEN": "test-token"}
        layout = write_oci_layout(tmp_path / "l", [[file("d", b"d")]], {"Cmd": ["/d"]})
        proc = ember_env(tcp, "image", "import", str(layout), "--tag", "dir:1", home=home)
        assert proc.returncode == 0, proc.stderr
        assert f"uploading {layout} (" in proc.stderr and "as a tar" in proc.stderr
        archive = tar_directory(write_oci_layout(tmp_path / "m", [[file("t", b"t")]],
                                                 {"Cmd": ["/t"]}), tmp_path / "m.tar")
        proc = ember_env(tcp, "image", "import", "-q", str(archive), "-t", "tar:1", home=home)
        assert proc.returncode == 0, proc.stderr
        tags = sorted(t for i in json.loads(
            ember_env(tcp, "image", "ls", "--json", home=home).stdout) for t in i["tags"])
        assert tags == ["dir:1", "tar:1"]
    finally:
        serve.terminate()
        serve.wait(60)


def ember_env(extra: dict[str, str], *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EMBER_HOME": str(home), **extra}
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)


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
