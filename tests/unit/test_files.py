"""ember.files: copying with the tool through the real agent in test mode, and
extract_to_host against hostile archives.

In test mode the agent's "guest" is the host, so guest paths are under tmp_path.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_agent_host import T, start_agent

import ember.guest.agent as agent_builder
from ember.agent.client import AgentClient, Process
from ember.agent.protocol import ExecRequest, ExitStatus
from ember.files import (
    CopyError,
    GuestNotADirectory,
    GuestPathNotFound,
    UnsafeArchive,
    extract_to_host,
    get_archive,
    get_file,
    put_archive,
    put_file,
)

# ----------------------------------------------------------- a tar builder


def tar_of(*entries: tuple[str, str, Any]) -> bytes:
    """A tar of (kind, name, arg) entries: file (data), dir, sym (target), link (target),
    chr, fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for kind, name, arg in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1700000000
            data = None
            if kind == "file":
                data = arg if isinstance(arg, bytes) else arg[0]
                info.size = len(data)
                info.mode = 0o644 if isinstance(arg, bytes) else arg[1]
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, arg or 0o755
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, arg
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, arg
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            info.uid = info.gid = 1234
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [m.name for m in tf]


# ------------------------------------------------------ extract_to_host


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "dest"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    return d


def test_extract_to_host_makes_the_tree(dest: Path) -> None:
    extract_to_host(tar_of(("dir", "d", 0o750), ("file", "d/f", (b"data", 0o640)),
                           ("sym", "d/l", "f"), ("link", "d/h", "d/f"), ("fifo", "d/p", None),
                           ("dir", "d/ro", 0o555), ("file", "d/ro/x", b"x")), dest)
    d = dest / "d"
    assert (d / "f").read_bytes() == b"data" and (d / "l").read_bytes() == b"data"
    assert os.readlink(d / "l") == "f"
    assert os.stat(d / "h").st_ino == os.stat(d / "f").st_ino
    assert stat.S_ISFIFO(os.lstat(d / "p").st_mode)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(d / "f").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(d / "ro").st_mode) == 0o555  # set after its children
    assert os.stat(d / "f").st_mtime == 1700000000
    assert os.stat(d / "f").st_uid == os.geteuid()  # never the archive's 1234


@pytest.mark.parametrize("entries, message", [
    ([("file", "../evil", b"x")], "'..' component"),
    ([("file", "a/../../evil", b"x")], "'..' component"),
    ([("file", "/etc/evil", b"x")], "absolute path"),
    ([("chr", "null", None)], "device node"),
    ([("sym", "l", "/etc/passwd")], "outside the destination"),
    ([("dir", "d", None), ("sym", "d/l", "../../outside")], "outside the destination"),
    ([("link", "h", "../outside/secret")], "'..' component"),
    ([("file", "ok", b"x"), ("sym", "up", "..")], "outside the destination"),
])
def test_extract_to_host_refuses_hostile_entries_before_writing(
        dest: Path, entries: list[tuple[str, str, Any]], message: str) -> None:
    with pytest.raises(UnsafeArchive, match=message):
        extract_to_host(tar_of(*entries), dest)
    assert not dest.exists() or not any(dest.iterdir())


def test_a_symlink_made_inside_cannot_be_used_to_climb_out(dest: Path, outside: Path) -> None:
    # "d -> ." stays inside, and lexically d/d/l -> ../outside/x does too; really
    # l lands in dest itself, where ../outside leaves it.
    with pytest.raises(UnsafeArchive, match="outside the destination"):
        extract_to_host(tar_of(("sym", "d", "."), ("sym", "d/d/l", "../outside/x")), dest)
    assert not (dest / "l").exists()


def test_a_symlink_already_in_dest_is_not_followed_out(dest: Path, outside: Path) -> None:
    dest.mkdir()
    (dest / "escape").symlink_to(outside)
    (dest / "escape2").symlink_to("../outside")
    for name in ("escape/evil", "escape2/evil"):
        with pytest.raises(UnsafeArchive, match="leaves the destination"):
            extract_to_host(tar_of(("file", name, b"x")), dest)
    assert list(outside.iterdir()) == []


def test_outside_symlinks_on_request_are_made_but_never_followed(dest: Path,
                                                                 outside: Path) -> None:
    extract_to_host(tar_of(("sym", "abs", str(outside))), dest, allow_outside_symlinks=True)
    assert os.readlink(dest / "abs") == str(outside)
    with pytest.raises(UnsafeArchive, match="leaves the destination"):
        extract_to_host(tar_of(("sym", "abs", str(outside)), ("file", "abs/evil", b"x")), dest,
                        allow_outside_symlinks=True)
    assert list(outside.iterdir()) == []


def test_no_setuid_bits_and_no_owner_from_the_archive(dest: Path) -> None:
    extract_to_host(tar_of(("file", "suid", (b"#!/bin/sh\n", 0o6755)),
                           ("dir", "sticky", 0o1777)), dest)
    assert stat.S_IMODE(os.stat(dest / "suid").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "sticky").st_mode) == 0o777


def test_a_directory_and_a_file_do_not_replace_each_other(dest: Path) -> None:
    dest.mkdir()
    (dest / "d").mkdir()
    (dest / "d" / "keep").write_text("mine")
    (dest / "f").write_text("old")
    with pytest.raises(CopyError, match="over the directory"):
        extract_to_host(tar_of(("file", "d", b"x")), dest)
    with pytest.raises(CopyError, match="over the non-directory"):
        extract_to_host(tar_of(("dir", "f", None)), dest)
    extract_to_host(tar_of(("file", "f", b"new"), ("file", "d/other", b"o")), dest)
    assert (dest / "f").read_text() == "new" and (dest / "d" / "keep").read_text() == "mine"


def test_a_corrupt_archive_is_a_copy_error(dest: Path) -> None:
    with pytest.raises(CopyError, match="corrupt"):
        extract_to_host(tar_of(("file", "f", b"x" * 5000))[:1500], dest)


# --------------------------------------------- copying through the agent


class HostMachine:
    """What ember.files uses of a Machine, over the agent in test mode."""

    name = "test"

    def __init__(self, agent: AgentClient, agent_pid: int) -> None:
        self.agent = agent
        self.agent_pid = agent_pid
        self.exits: list[ExitStatus] = []  # of every process waited for, in order

    def exec(self, req: ExecRequest, *, on_stdout: Callable[[bytes], None] | None = None,
             on_stderr: Callable[[bytes], None] | None = None) -> Process:
        return self.agent.exec(req, on_stdout=on_stdout, on_stderr=on_stderr)

    def wait_process(self, proc: Process, timeout: float | None = None) -> ExitStatus:
        status = proc.wait(timeout)
        self.exits.append(status)
        return status


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    agent_bin = agent_builder.build_agent(tmp_path_factory.mktemp("cache"))
    with start_agent(agent_bin) as r:
        c = AgentClient(r.sock)
        c.hello(T)
        yield HostMachine(c, r.proc.pid)
        c.close()


def test_put_file_then_get_file_is_byte_exact(machine: Any, tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000 + b"\0tail"
    target = tmp_path / "new" / "dir" / "blob"
    put_file(machine, str(target), data, mode=0o600)
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert get_file(machine, str(target)) == data


def test_put_archive_then_get_archive_round_trips_a_tree(machine: Any, tmp_path: Path) -> None:
    archive = tar_of(("dir", "tree", None), ("file", "tree/a", b"A"), ("dir", "tree/sub", None),
                     ("file", "tree/sub/b", (b"B" * 70000, 0o755)), ("sym", "tree/l", "a"))
    put_archive(machine, str(tmp_path / "in"), io.BytesIO(archive))
    assert (tmp_path / "in" / "tree" / "sub" / "b").read_bytes() == b"B" * 70000
    out = get_archive(machine, str(tmp_path / "in" / "tree"))
    assert sorted(names(out)) == ["tree", "tree/a", "tree/l", "tree/sub", "tree/sub/b"]
    extract_to_host(out, tmp_path / "back")
    assert (tmp_path / "back" / "tree" / "sub" / "b").read_bytes() == b"B" * 70000
    assert os.readlink(tmp_path / "back" / "tree" / "l") == "a"


def test_errors_are_one_clear_line(machine: Any, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(GuestPathNotFound, match=f"^{missing}: no such file or directory"):
        get_archive(machine, str(missing))
    with pytest.raises(GuestPathNotFound):
        get_file(machine, str(missing))
    (tmp_path / "file").write_text("x")
    with pytest.raises(GuestNotADirectory, match="not a directory"):
        put_archive(machine, str(tmp_path / "file"), tar_of(("file", "f", b"x")))
    with pytest.raises(GuestNotADirectory, match="not a directory"):
        put_file(machine, str(tmp_path / "file" / "f"), b"x")
    with pytest.raises(CopyError, match="is a directory"):
        get_file(machine, str(tmp_path))
    with pytest.raises(CopyError, match="is a directory"):
        put_file(machine, str(tmp_path), b"x")
    with pytest.raises(CopyError, match="invalid tar magic"):
        put_archive(machine, str(tmp_path / "x"), b"this is not a tar archive" * 100)


def test_an_endless_file_stops_at_the_limit(machine: Any) -> None:
    with pytest.raises(CopyError, match="larger than 1048576 bytes"):
        get_file(machine, "/dev/zero", limit=1 << 20)
    # the reader was killed at the limit, not left running (nor waited for)
    assert machine.exits[-1] == ExitStatus(signal=9)
    children = Path(f"/proc/{machine.agent_pid}/task/{machine.agent_pid}/children")
    assert children.read_text().split() == []
