"""The main-process log: capped at two files, with arrival times for --since/--timestamps."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ember.daemon import logs
from ember.daemon.logs import CappedLog, LogFollower, LogView, format_time, read_log


def test_the_log_keeps_the_newest_output_in_two_capped_files(tmp_path: Path) -> None:
    log = CappedLog(tmp_path / "out.log", cap=100)
    for i in range(50):
        log.write(f"line {i:02d}\n".encode())  # 8 bytes each: 400 bytes in all
    data = read_log(tmp_path / "out.log")
    assert 100 < len(data) <= 200 and data.endswith(b"line 49\n")
    assert (tmp_path / "out.log").stat().st_size <= 100
    assert (tmp_path / "out.log.1").stat().st_size == 100
    # the index rotates with its file: never more entries than writes into that file
    assert (tmp_path / "out.log.idx").stat().st_size <= 16 * 13
    assert read_log(tmp_path / "out.log", LogView(tail=2)) == b"line 48\nline 49\n"


def test_timestamps_are_each_lines_arrival(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    clock = iter([1_000_000_000_000_000_000, 1_000_000_002_500_000_000,
                  1_000_000_004_000_000_000])
    monkeypatch.setattr(logs.time, "time_ns", lambda: next(clock))
    log = CappedLog(tmp_path / "out.log")
    log.write(b"a\nb")           # t0: "a" and the start of "b..."
    log.write(b"c\nd\n")         # t0+2.5 s: the rest of "bc", then "d"
    log.write(b"e\n")            # t0+4 s
    view = LogView(timestamps=True)
    assert read_log(tmp_path / "out.log", view).decode().splitlines() == [
        "2001-09-09T01:46:40.000000000Z a", "2001-09-09T01:46:40.000000000Z bc",
        "2001-09-09T01:46:42.500000000Z d", "2001-09-09T01:46:44.000000000Z e"]
    since = LogView(since_ns=1_000_000_002_000_000_000)
    assert read_log(tmp_path / "out.log", since) == b"d\ne\n"
    assert format_time(1_000_000_000_123_456_789) == "2001-09-09T01:46:40.123456789Z"


def test_writes_within_a_millisecond_share_an_index_entry(tmp_path: Path) -> None:
    log = CappedLog(tmp_path / "out.log")
    start = time.monotonic()
    writes = 0
    while time.monotonic() - start < 0.05:
        log.write(b"x\n")
        writes += 1
    entries = (tmp_path / "out.log.idx").stat().st_size // 16
    assert 1 <= entries <= 51 + 1 and entries < writes


def test_a_follower_sees_every_line_once_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    log = CappedLog(path, cap=64)
    log.write(b"before\n")
    follower = LogFollower(path)
    assert follower.history() == b"before\n"
    got = b""
    for i in range(40):  # rotates every ~8 lines; polled after every write, and not
        log.write(f"line {i:02d}\n".encode())
        if i % 3 == 0:
            got += follower.poll()
    got += follower.poll()
    assert got == b"".join(f"line {i:02d}\n".encode() for i in range(40))


def test_a_follower_with_timestamps_does_not_stamp_the_rest_of_a_line(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    log = CappedLog(path)
    log.write(b"half")
    follower = LogFollower(path, LogView(timestamps=True))
    assert follower.history().endswith(b" half")
    log.write(b" and the rest\nnext\n")
    out = follower.poll().decode().splitlines()
    assert out[0] == " and the rest" and out[1].endswith("Z next")
