"""`ember run` end to end: real QEMU, real guest kernel, real images, the real CLI."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ember import paths
from ember.images import ImageStore

pytestmark = pytest.mark.vm


def ember(*args: str, input: bytes | None = None, timeout: float = 180,
          check_rc: int | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the real CLI (``python -m ember.cli``) as a user would."""
    proc = subprocess.run([sys.executable, "-m", "ember.cli", *args], input=input,
                          capture_output=True, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr.decode(errors="replace")
    return proc


@pytest.fixture(autouse=True)
def _store(store: ImageStore) -> None:
    """Every test here needs the session's images (and so the guest bundle)."""


def test_runs_a_command_and_streams_its_output() -> None:
    proc = ember("run", "-q", "sample", "--", "echo", "hello from the guest", check_rc=0)
    assert proc.stdout == b"hello from the guest\n"


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_code_of_the_guest_command_is_returned(code: int) -> None:
    proc = ember("run", "-q", "sample", "--", "sh", "-c", f"exit {code}")
    assert proc.returncode == code, proc.stderr


def test_death_by_signal_is_128_plus_the_signal() -> None:
    proc = ember("run", "-q", "sample", "--", "sh", "-c", "kill -TERM $$")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr


def test_stdout_and_stderr_are_not_mixed() -> None:
    proc = ember("run", "-q", "sample", "--", "sh", "-c",
                 "echo out1; echo err1 >&2; echo out2; echo err2 >&2", check_rc=0)
    assert proc.stdout == b"out1\nout2\n"
    assert proc.stderr == b"err1\nerr2\n"


def test_ten_mib_of_stdout_arrive_byte_exact() -> None:
    size = 10 * 1024 * 1024
    proc = ember("run", "-q", "sample", "--", "sh", "-c",
                 f"head -c {size} /dev/urandom > /tmp/blob && sha256sum /tmp/blob >&2 "
                 "&& cat /tmp/blob", check_rc=0)
    assert len(proc.stdout) == size
    guest_sum = proc.stderr.split()[0].decode()
    assert hashlib.sha256(proc.stdout).hexdigest() == guest_sum


def test_stdin_is_piped_through_with_eof() -> None:
    data = b"".join(b"line %d of the host's stdin\n" % i for i in range(5000))
    proc = ember("run", "-q", "sample", "--", "sh", "-c", "sha256sum; echo done >&2",
                 input=data, check_rc=0)
    assert proc.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert proc.stderr == b"done\n"


def test_image_config_applies_cmd_env_workdir_and_user() -> None:
    proc = ember("run", "-q", "sample", check_rc=0)
    out = proc.stdout.decode()
    assert "Hello, world!" in out
    assert "user app (uid 1000)" in out
    assert "working directory /app" in out


def test_flags_override_env_workdir_and_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_HOST", "passed")
    proc = ember("run", "-q", "-e", "FOO=bar", "-e", "GREETING=Hi", "-e", "FROM_HOST",
                 "-w", "/tmp", "--user", "65534:65534", "sample", "--", "sh", "-c",
                 'echo "$FOO $GREETING $FROM_HOST $(pwd) $(id -u):$(id -g)"', check_rc=0)
    assert proc.stdout == b"bar Hi passed /tmp 65534:65534\n"


def test_entrypoint_and_cmd_combine_like_docker() -> None:
    assert ember("run", "-q", "entry", check_rc=0).stdout == b"entry default\n"
    assert ember("run", "-q", "entry", "--", "x", "y", check_rc=0).stdout == b"entry x y\n"


def test_layers_apply_whiteouts_opaque_dirs_and_hardlinks() -> None:
    proc = ember("run", "-q", "--user", "root", "sample", "--", "sh", "-c",
                 "ls /etc/motd-old 2>/dev/null || echo whited-out; ls /opt/old; "
                 "cat /app/data.txt; stat -c '%h %U %a' /app/hello.sh /app/data.txt",
                 check_rc=0)
    assert proc.stdout.decode().splitlines() == [
        "whited-out", "new", "layer three", "2 root 755", "1 app 640"]


def test_guest_has_its_own_kernel_and_a_writable_ephemeral_root() -> None:
    first = ember("run", "-q", "--user", "root", "sample", "--", "sh", "-c",
                  "uname -r; echo data > /etc/new-file && cat /etc/new-file", check_rc=0)
    kernel, data = first.stdout.decode().splitlines()
    assert kernel.startswith("6.1.") and kernel != os.uname().release
    assert data == "data"
    second = ember("run", "-q", "sample", "--", "sh", "-c", "cat /etc/new-file 2>&1; true",
                   check_rc=0)
    assert b"No such file" in second.stdout


def test_run_accepts_a_path_and_imports_it(tmp_path: Path, sample_layout: Path) -> None:
    proc = ember("run", "-q", str(sample_layout), "--", "echo", "from a path", check_rc=0)
    assert proc.stdout == b"from a path\n"


def test_unknown_command_is_127_with_a_message() -> None:
    proc = ember("run", "-q", "sample", "--", "no-such-program")
    assert proc.returncode == 127
    assert b"no-such-program" in proc.stderr and proc.stderr.count(b"\n") == 1


def test_unknown_image_is_one_line_and_status_125() -> None:
    proc = ember("run", "-q", "no-such-image:latest", "--", "true")
    assert proc.returncode == 125
    assert proc.stderr.startswith(b"ember: error:") and proc.stderr.count(b"\n") == 1


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def background_run() -> tuple[subprocess.Popen[bytes], Path, int]:
    """`ember run` of a long command, once it runs: (ember process, state dir, QEMU pid)."""
    machines = paths.machines_dir()
    before = set(os.listdir(machines)) if machines.exists() else set()
    proc = subprocess.Popen([sys.executable, "-m", "ember.cli", "run", "-q", "sample", "--",
                             "sh", "-c", "echo started; sleep 600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        # blocks until the guest command runs: the test's timeout bounds it
        assert proc.stdout.readline() == b"started\n"
        (name,) = set(os.listdir(machines)) - before
        state = machines / name
        return proc, state, int((state / "qemu.pid").read_text())
    except BaseException:  # a failure or a timeout: ember run (and so its QEMU) goes too
        proc.kill()
        proc.wait()
        raise


@pytest.mark.timeout(180)  # background_run waits for the guest without a bound of its own
def test_qemu_killed_mid_run_gives_a_clear_error_and_leaves_nothing() -> None:
    proc, state, pid = background_run()
    try:
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 125
    assert re.search(rb"QEMU exited unexpectedly \(signal 9\)", err), err
    assert not state.exists()
    assert not alive(pid)

def test_doctor_reports_accelerator_and_built_artifacts() -> None:
    import json

    proc = ember("doctor", "--json", check_rc=0)
    report = json.loads(proc.stdout)
    assert report["accelerator"]["name"] in ("kvm", "tcg")
    assert report["accelerator"]["reason"]
    assert report["kernel"]["built"] and Path(report["kernel"]["path"]).is_file()
    assert report["initramfs"]["built"] and Path(report["initramfs"]["path"]).is_file()
    assert report["qemu"]["version"]


@pytest.mark.timeout(180)  # readline waits for the guest without a bound of its own
def test_ctrl_c_is_passed_to_the_guest_command() -> None:
    machines = paths.machines_dir()
    before = set(os.listdir(machines)) if machines.exists() else set()
    proc = subprocess.Popen([sys.executable, "-m", "ember.cli", "run", "-q", "sample", "--",
                             "sh", "-c", 'trap "echo got INT; exit 5" INT; echo ready; '
                             "while true; do sleep 0.1; done"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out == b"got INT\n", err
    assert proc.returncode == 5
    assert set(os.listdir(machines)) == before  # state directory, sockets, memory file: gone


def test_guest_that_reboots_itself_is_reported_not_hung() -> None:
    proc = ember("run", "-q", "--user", "root", "sample", "--", "sh", "-c",
                 "echo bye; reboot -f", timeout=120)
    assert proc.returncode == 125
    assert proc.stdout == b"bye\n"
    assert b"rebooted or powered off on its own" in proc.stderr


def test_two_machines_run_at_once_independently() -> None:
    procs = [subprocess.Popen([sys.executable, "-m", "ember.cli", "run", "-q",
                               "--hostname", f"vm{i}", "sample", "--", "sh", "-c",
                               f"hostname; echo {i} > /tmp/mine; sleep 1; cat /tmp/mine"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, err
        assert out == f"vm{i}\n{i}\n".encode()


@pytest.mark.timeout(180)
def test_killing_ember_run_takes_its_qemu_along_and_the_next_run_reaps_the_rest() -> None:
    proc, state, qemu_pid = background_run()
    proc.kill()  # SIGKILL: ember cannot clean up after itself
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while alive(qemu_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(qemu_pid), "QEMU outlived ember run"
    assert state.exists()  # left behind ...
    ember("run", "-q", "sample", "--", "true", check_rc=0)
    assert not state.exists()  # ... and reaped by the next run

def test_run_by_image_id_and_short_prefix(store: ImageStore) -> None:
    image = store.resolve("sample:latest")
    for ref in (image.id, image.short_id[:8]):
        assert ember("run", "-q", ref, "--", "echo", "by id", check_rc=0).stdout == b"by id\n"


def test_running_an_archive_that_names_a_taken_tag_moves_it_and_says_so(
        tmp_path: Path, store: ImageStore, daemon: object) -> None:
    from ember.sample import DEFAULT_CONFIG, busybox_layers, write_oci_layout

    layers = busybox_layers(1)
    old = store.import_path(write_oci_layout(tmp_path / "old", layers,
                                             {**DEFAULT_CONFIG, "Labels": {"v": "old"}}),
                            tag="runmove:1")
    new = write_oci_layout(tmp_path / "new", layers, {**DEFAULT_CONFIG, "Labels": {"v": "new"}},
                           tag="runmove:1")
    proc = ember("run", "-q", str(new), "--", "true", check_rc=0)
    assert proc.stderr == f"ember: tag runmove:1 moved from image {old.short_id}\n".encode()
    assert store.resolve("runmove:1").id != old.id
    assert store.resolve(old.id).tags == ()
    # the image that lost its tag is what `prune` (through the daemon) takes
    proc = ember("image", "prune", check_rc=0)
    assert f"Deleted: {old.id}\n".encode() in proc.stdout
    assert ember("image", "rm", "runmove:1", check_rc=0).stdout.startswith(b"Untagged: ")
