"""The console recorder: everything QEMU writes lands on disk, and never more than two caps."""

from __future__ import annotations

import socket
from pathlib import Path

from ember.vmm.console import ConsoleRecorder, listen, tail


def feed(tmp_path: Path, chunks: list[bytes], cap: int) -> ConsoleRecorder:
    sock_path = str(tmp_path / "console.sock")
    rec = ConsoleRecorder(listen(sock_path), tmp_path / "console.log", cap=cap)
    with socket.socket(socket.AF_UNIX) as qemu:  # plays QEMU's client chardev
        qemu.connect(sock_path)
        for c in chunks:
            qemu.sendall(c)
    rec.wait(5)
    return rec


def test_console_is_recorded_and_tail_reads_last_lines(tmp_path: Path) -> None:
    feed(tmp_path, [b"boot\n", b"line 1\nline 2\n", b"panic: the end\n"], cap=1 << 20)
    assert (tmp_path / "console.log").read_bytes() == b"boot\nline 1\nline 2\npanic: the end\n"
    assert tail(tmp_path / "console.log", 2) == "line 2\npanic: the end"


def test_a_flooding_guest_is_capped_to_two_files_keeping_the_newest(tmp_path: Path) -> None:
    cap = 64 * 1024
    lines = [b"%08d ........................................................\n" % i
             for i in range(20000)]  # ~1.3 MB: twenty caps
    rec = feed(tmp_path, lines, cap=cap)
    current, previous = tmp_path / "console.log", rec.previous
    assert current.stat().st_size <= cap and previous.stat().st_size <= cap
    assert tail(current, 1) == lines[-1].decode().rstrip("\n")
    # the two files hold the newest output, in order, without gaps between them
    kept = previous.read_bytes() + current.read_bytes()
    assert b"".join(lines).endswith(kept)


def test_recorder_stops_if_qemu_never_connects(tmp_path: Path) -> None:
    rec = ConsoleRecorder(listen(str(tmp_path / "c.sock")), tmp_path / "console.log")
    rec.stop()
    rec.wait(5)
    assert (tmp_path / "console.log").read_bytes() == b""
