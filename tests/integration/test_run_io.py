"""`ember run`'s stdin and terminal flags (-i, -t, -it) and --entrypoint, as a user types them.

The terminal tests run `ember run` on a real pseudo-terminal (``pty.fork``),
as a user's shell would.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios

import pytest

from ember.images import ImageStore

pytestmark = pytest.mark.vm


@pytest.fixture(autouse=True)
def _store(store: ImageStore) -> None:
    """Every test here needs the session's images (and so the guest bundle)."""


def ember(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], input=input,
                          capture_output=True, timeout=180,
                          stdin=None if input is not None else subprocess.DEVNULL)


def on_a_terminal(args: list[str], typed: bytes = b"", when: bytes | None = None,
                  rows: int = 30, cols: int = 100) -> tuple[int, bytes]:
    """Run ``ember ARGS`` on a new pseudo-terminal of ``rows`` x ``cols``.

    ``typed`` is written to the terminal once its output contains ``when``.
    Returns (exit status, everything the terminal showed). The test's timeout
    bounds a hang; the child is killed on any failure.
    """
    pid, fd = pty.fork()
    if pid == 0:  # the child: on the terminal, as from a shell
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            os.execv(sys.executable, [sys.executable, "-m", "ember.cli", *args])
        finally:
            os._exit(127)
    out = b""
    sent = not typed
    try:
        while True:
            if not sent and when is not None and when in out:
                os.write(fd, typed)
                sent = True
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child and its terminal are gone
                    break
                if not chunk:
                    break
                out += chunk
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out


# ---------------------------------------------------------------- stdin


def test_i_passes_piped_stdin_through() -> None:
    proc = ember("run", "-q", "-i", "sample", "--", "sh", "-c", "wc -c; cat", input=b"12345")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"5"]


@pytest.mark.timeout(180)
def test_i_passes_a_terminals_input_through_and_without_it_stdin_is_empty() -> None:
    cmd = ["sh", "-c", "echo ready; read x; echo \"got [$x]\""]
    # -i: what is typed on the terminal reaches the command
    status, out = on_a_terminal(["run", "-q", "-i", "sample", "--", *cmd],
                                typed=b"typed\n", when=b"ready")
    assert status == 0, out
    assert b"got [typed]" in out
    # without -i a terminal's input is not read: the command finds stdin empty
    status, out = on_a_terminal(["run", "-q", "sample", "--", *cmd])
    assert status == 0, out
    assert b"got []" in out


# ---------------------------------------------------------------- terminals


@pytest.mark.timeout(180)
def test_t_runs_the_command_on_a_terminal_of_the_hosts_size() -> None:
    status, out = on_a_terminal(["run", "-q", "-t", "sample", "--", "sh", "-c",
                                 "tty; stty size; exit 3"], rows=30, cols=100)
    assert status == 3, out
    lines = out.replace(b"\r\n", b"\n").splitlines()
    assert lines[-2:] == [b"/dev/pts/0", b"30 100"], out


@pytest.mark.timeout(180)
def test_without_t_the_command_has_no_terminal() -> None:
    status, out = on_a_terminal(["run", "-q", "sample", "--", "sh", "-c", "tty; exit 0"])
    assert status == 0 and b"not a tty" in out, out


@pytest.mark.timeout(180)
def test_it_gives_an_interactive_shell() -> None:
    status, out = on_a_terminal(
        ["run", "-q", "-it", "sample", "--", "sh", "-c",
         "stty size; read x; echo \"got [$x]\"; tty; exit 9"],
        typed=b"typed\r", when=b"30 100", rows=30, cols=100)
    assert status == 9, out
    text = out.replace(b"\r\n", b"\n")
    assert b"got [typed]\n/dev/pts/0" in text, out


# ---------------------------------------------------------------- --entrypoint


@pytest.mark.parametrize(("args", "want"), [
    (["entry"], b"entry default\n"),                                   # the image's
    (["--entrypoint", "/bin/echo", "entry", "--", "x"], b"x\n"),        # replaced
    (["--entrypoint", "/bin/echo", "entry"], b"\n"),                   # and its Cmd dropped
    (["--entrypoint", "", "entry", "--", "echo", "cleared"], b"cleared\n"),
])
def test_entrypoint_replaces_or_clears_the_images(args: list[str], want: bytes) -> None:
    proc = ember("run", "-q", *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want


def test_entrypoint_cleared_without_a_command_is_an_error() -> None:
    proc = ember("run", "-q", "--entrypoint", "", "entry")
    assert proc.returncode == 125
    assert proc.stderr.startswith(b"ember: error:") and b"no command" in proc.stderr

