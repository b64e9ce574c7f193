"""Copying files into and out of a running machine (``ember cp``, the API's files put/get).

An image may have no ``tar`` and not even a shell (distroless), so Ember brings
its own tool: the host's static busybox (Debian's ``busybox-static``). The agent
keeps it in a sealed memfd and runs it without writing it into the guest's
filesystem (``AgentClient.load_tool``, ``ExecRequest(tool=True)``; see
docs/agent-protocol.md). It is sent once per guest: the agent says in READY
whether it holds one already, so a restarted daemon does not send it again.

Archives are plain tar streams, as ``docker cp`` and Docker's archive API use
them: :func:`get_archive` of ``/a/b`` holds ``b`` (and ``b/...`` for a
directory). Inside the guest, tar runs as root: the guest is the user's own and
tar's usual semantics apply there. Out of the guest it is the other way round:
the archive is hostile, and :func:`extract_to_host` never writes outside its
destination, creates no device nodes, and takes no ownership, set-id bits or
extended attributes from it.

Guest paths are absolute, or relative to the guest's ``/`` (as with ``docker cp``).
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import signal
import stat
import struct
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ember.agent.client import ExecFailed, ProcessTimeout
from ember.agent.protocol import ExecRequest, ExitStatus
from ember.errors import EmberError, HostError
from ember.safepath import NotADirectory, PathEscapes, TooManySymlinks, resolve_inside

if TYPE_CHECKING:
    from ember.agent.client import Process
    from ember.machine import Machine

#: Where the host's static busybox is looked for (``busybox-static`` installs /bin/busybox).
BUSYBOX_PATHS = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
#: What :func:`get_archive` and :func:`get_file` hold in memory at most, by default.
DEFAULT_GET_LIMIT = 256 << 20

_ENV = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin",)
_FEED_CHUNK = 1 << 20
_STDERR_CAP = 64 << 10
#: An archive of ``/``: everything but the API filesystems (/proc/kcore alone is
#: as large as the address space, and /dev holds device nodes). busybox tar has
#: no --exclude, so the shell lists the top level.
_TAR_ROOT = """cd / || exit 1
set --
for f in * .[!.]* ..?*; do
  case "$f" in proc|sys|dev) continue;; esac
  if [ -e "$f" ] || [ -L "$f" ]; then set -- "$@" "./$f"; fi
done
exec tar -c -f - -- "$@"
"""


class CopyError(EmberError):
    """Copying to or from a machine failed; the message says why, in one line."""


class GuestPathNotFound(CopyError):
    """The path does not exist in the guest."""


class GuestNotADirectory(CopyError):
    """A path that must be a directory in the guest is something else."""


class UnsafeArchive(CopyError):
    """An archive from a guest holds an entry that would escape its destination on the host,
    or one that is never extracted there (a device node...)."""


# ------------------------------------------------------------------ the tool


def _is_static_x86_64(data: bytes) -> str:
    """Why ``data`` (the start of a file) is not a static x86-64 ELF executable; "" if it is."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return "is not a 64-bit little-endian ELF executable"
    (machine,) = struct.unpack_from("<H", data, 0x12)
    if machine != 62:
        return "is not an x86-64 executable"
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 4 > len(data):
            return "has a truncated ELF header"
        if struct.unpack_from("<I", data, off)[0] == 3:  # PT_INTERP: a dynamic loader
            return "is dynamically linked"
    return ""


def host_busybox() -> Path:
    """The host's static busybox, the tool Ember runs in guests to copy files.

    Raises:
        HostError: there is none, or it is not a static x86-64 binary (Debian's
            dynamically linked ``busybox`` package installs the same path).
    """
    for path in BUSYBOX_PATHS:
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise HostError(f"cannot read {path}: {exc.strerror}") from exc
        why = _is_static_x86_64(head)
        if why:
            raise HostError(f"{path} {why}: copying files needs a static busybox "
                            "(apt-get install busybox-static, or run `ember setup`)")
        return path
    raise HostError("no busybox on the host: copying files needs a static busybox "
                    "(apt-get install busybox-static, or run `ember setup`)")


def ensure_tool(machine: Machine) -> None:
    """Make sure the machine's agent holds the tool (sends it once per guest).

    Raises:
        HostError: no static busybox on the host.
        CopyError: the machine is not running.
        AgentError: the agent cannot take a tool or refused it.
    """
    agent = machine.agent
    if agent is None:
        raise CopyError(f"machine {machine.name} is not running")
    if not agent.tool_loaded:
        agent.load_tool(host_busybox().read_bytes())


def _guest_path(path: str) -> str:
    if not path or "\0" in path:
        raise CopyError(f"invalid guest path {path!r}")
    return posixpath.normpath("/" + path.lstrip("/"))


def _reason(stderr: bytes) -> str:
    """The first line of a busybox applet's complaint, without the ``applet:`` prefix."""
    for line in stderr.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line or "error exit delayed" in line:
            continue
        applet, sep, rest = line.partition(": ")
        return rest if sep and " " not in applet else line
    return ""


def _run(machine: Machine, argv: list[str], *, source: bytes | BinaryIO | None = None,
         on_stdout: Callable[[bytes], None] | None = None,
         stop: threading.Event | None = None) -> tuple[ExitStatus, bytes]:
    """Run a tool applet in the guest as root; its exit status and (capped) stderr.

    ``source`` is fed to its stdin; when ``stop`` is set the process is killed.
    """
    ensure_tool(machine)
    err = bytearray()

    def on_stderr(data: bytes) -> None:
        err.extend(data[:_STDERR_CAP - len(err)])

    req = ExecRequest(argv, env=_ENV, tool=True, stdin=source is not None)
    proc = machine.exec(req, on_stdout=on_stdout or (lambda _: None), on_stderr=on_stderr)
    try:
        if source is not None:
            _feed(proc, source)
        killed = False
        while True:
            try:
                # Polled only while a stop event can end it early (the reader
                # thread, where it is set, must not send frames itself).
                timeout = 0.1 if stop is not None and not killed else None
                status = machine.wait_process(proc, timeout)
                break
            except ProcessTimeout:
                if stop is not None and stop.is_set():
                    proc.signal(signal.SIGKILL)
                    killed = True
    except ExecFailed as exc:
        raise CopyError(f"machine {machine.name}: cannot run the copy tool: {exc.message}") from exc
    return status, bytes(err)


def run_tool(machine: Machine, argv: list[str], *, limit: int = 1 << 20,
             timeout: float | None = None) -> tuple[int, bytes, str]:
    """Run a tool applet (``["ps", ...]``) in the guest as root: exit code, stdout (at most
    ``limit`` bytes kept), stderr's one line. After ``timeout`` seconds it is killed
    (exit code 137): a stuck guest never holds the caller."""
    out = bytearray()

    def on_stdout(data: bytes) -> None:
        out.extend(data[:limit - len(out)])

    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set) if timeout is not None else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        status, err = _run(machine, argv, on_stdout=on_stdout,
                           stop=stop if timer is not None else None)
    finally:
        if timer is not None:
            timer.cancel()
    return status.exit_code, bytes(out), _reason(err)


def _feed(proc: Process, source: bytes | BinaryIO) -> None:
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source)
        for i in range(0, len(view), _FEED_CHUNK):
            if proc.done():  # tar gave up: the rest would be dropped anyway
                break
            proc.write_stdin(bytes(view[i:i + _FEED_CHUNK]))
    else:
        while not proc.done():
            chunk = source.read(_FEED_CHUNK)
            if not chunk:
                break
            proc.write_stdin(chunk)
    proc.close_stdin()


# ----------------------------------------------------------- into the guest


def put_archive(machine: Machine, dest_dir: str, tar_bytes: bytes | BinaryIO, *,
                keep_owner: bool = False) -> None:
    """Extract a tar stream into directory ``dest_dir`` of the guest (created if missing).

    Entries replace what is there (a directory is merged). Files belong to root
    unless ``keep_owner`` (then the archive's numeric uid/gid, like Docker's
    ``copyUIDGID``); modes and mtimes are the archive's.

    Raises:
        GuestNotADirectory: ``dest_dir`` (or a parent) is not a directory.
        CopyError: tar failed (not a tar, a directory in the way of a file...).
        HostError, AgentError, MachineCrashed: see :func:`ensure_tool`; the machine died.
    """
    dest = _guest_path(dest_dir)
    script = 'mkdir -p -- "$1" && cd -- "$1" && exec tar -x "$2" -f -'
    argv = ["sh", "-c", script, "sh", dest, "--numeric-owner" if keep_owner else "-o"]
    status, err = _run(machine, argv, source=tar_bytes)
    if status.exit_code == 0:
        return
    reason = _reason(err) or str(status)
    first = err.decode("utf-8", "replace").lstrip()
    if not first.startswith("tar:") and ("Not a directory" in reason or "File exists" in reason):
        raise GuestNotADirectory(f"{dest}: not a directory in machine {machine.name}")
    raise CopyError(f"cannot copy into {dest} in machine {machine.name}: {reason}")


def put_file(machine: Machine, dest_path: str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to file ``dest_path`` of the guest (owned by root, parents created).

    Raises:
        CopyError: ``dest_path`` is a directory, or a parent is not one (see :func:`put_archive`).
    """
    path = _guest_path(dest_path)
    parent, base = posixpath.split(path)
    if not base:
        raise CopyError(f"{path}: is a directory in machine {machine.name}")
    info = tarfile.TarInfo(base)
    info.size = len(data)
    info.mode = mode & 0o7777
    info.mtime = int(time.time())
    info.uname = info.gname = "root"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(info, io.BytesIO(data))
    try:
        put_archive(machine, parent, buf.getvalue())
    except GuestNotADirectory:
        raise
    except CopyError as exc:
        if "Is a directory" in str(exc):
            raise CopyError(f"{path}: is a directory in machine {machine.name}") from exc
        raise


# ---------------------------------------------------------- out of the guest


def _read_out(machine: Machine, argv: list[str], what: str,
              write: Callable[[bytes], None], limit: int | None) -> tuple[ExitStatus, bytes]:
    total = 0
    over = threading.Event()

    def on_stdout(data: bytes) -> None:
        nonlocal total
        if over.is_set():
            return
        total += len(data)
        if limit is not None and total > limit:
            over.set()
            return
        write(data)

    status, err = _run(machine, argv, on_stdout=on_stdout, stop=over if limit else None)
    if over.is_set():
        raise CopyError(f"{what} in machine {machine.name} is larger than {limit} bytes")
    return status, err


def _out_error(machine: Machine, path: str, status: ExitStatus, err: bytes) -> CopyError:
    reason = _reason(err) or str(status)
    if "No such file or directory" in reason:
        return GuestPathNotFound(f"{path}: no such file or directory in machine {machine.name}")
    if "Not a directory" in reason:
        return GuestNotADirectory(f"{path}: a parent is not a directory in machine "
                                  f"{machine.name}")
    if "Is a directory" in reason:
        return CopyError(f"{path}: is a directory in machine {machine.name}")
    return CopyError(f"cannot copy {path} out of machine {machine.name}: {reason}")


def stream_archive(machine: Machine, path: str, write: Callable[[bytes], None], *,
                   limit: int | None = None) -> None:
    """Pass a tar of the file or directory at ``path`` to ``write``, chunk by chunk.

    Entries are named by the basename of ``path`` (an archive of ``/`` holds
    ``./...`` without /proc, /sys and /dev). ``write`` runs on the agent's
    reader thread and must not call into the agent. On an error what was
    written is incomplete.

    Raises:
        GuestPathNotFound: there is nothing at ``path``.
        CopyError: tar failed, or the archive exceeds ``limit`` bytes (then tar is killed).
    """
    gpath = _guest_path(path)
    parent, base = posixpath.split(gpath)
    if base:
        argv = ["tar", "-c", "-f", "-", "-C", parent, "--", base]
    else:
        argv = ["sh", "-c", _TAR_ROOT]
    status, err = _read_out(machine, argv, f"the archive of {gpath}", write, limit)
    if status.exit_code != 0:
        raise _out_error(machine, gpath, status, err)


def stream_upper_layer(machine: Machine, write: Callable[[bytes], None], *,
                       limit: int | None = None) -> None:
    """Pass a tar of the root overlay's upper layer (``./...``: what the machine changed,
    whiteouts as character devices 0:0; ``changes.py``) to ``write``.

    Raises:
        CopyError: tar failed (an agent older than the late root keeps no layers), or
            the archive exceeds ``limit`` bytes.
    """
    argv = ["tar", "-c", "-f", "-", "-C", "/proc/1/fd/900/", "."]
    status, err = _read_out(machine, argv, "the root's upper layer", write, limit)
    if status.exit_code != 0:
        raise CopyError(f"cannot read the root's changes in machine {machine.name}: "
                        f"{_reason(err) or status}")


def get_archive(machine: Machine, path: str, *, limit: int = DEFAULT_GET_LIMIT) -> bytes:
    """A tar of the file or directory at ``path`` in the guest (see :func:`stream_archive`)."""
    buf = bytearray()
    stream_archive(machine, path, buf.extend, limit=limit)
    return bytes(buf)


def get_file(machine: Machine, path: str, *, limit: int = DEFAULT_GET_LIMIT) -> bytes:
    """The contents of the file at ``path`` in the guest (a symlink is followed).

    Raises:
        GuestPathNotFound: there is nothing at ``path``.
        CopyError: it is a directory, unreadable, or larger than ``limit`` bytes.
    """
    gpath = _guest_path(path)
    buf = bytearray()
    status, err = _read_out(machine, ["cat", "--", gpath], gpath, buf.extend, limit)
    if status.exit_code != 0:
        raise _out_error(machine, gpath, status, err)
    return bytes(buf)


# ------------------------------------------------- onto the host, safely


def _split(name: str) -> tuple[str, ...]:
    if name.startswith("/"):
        raise UnsafeArchive(f"archive entry {name!r} has an absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchive(f"archive entry {name!r} has a '..' component")
    return parts


def _link_leaves(where: tuple[str, ...], target: str) -> bool:
    """Whether symlink ``target``, in directory ``where`` (relative to the root), leaves it."""
    if target.startswith("/"):
        return True
    stack = list(where)
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not stack:
                return True
            stack.pop()
        else:
            stack.append(comp)
    return False


def _check_entry(m: tarfile.TarInfo, allow_outside_symlinks: bool) -> tuple[str, ...]:
    parts = _split(m.name)
    if m.ischr() or m.isblk():
        raise UnsafeArchive(f"archive entry {m.name!r} is a device node")
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.isfifo()):
        raise UnsafeArchive(f"archive entry {m.name!r} has unsupported type {m.type!r}")
    if not parts and not m.isdir():
        raise UnsafeArchive(f"archive entry {m.name!r} would replace the destination")
    if m.islnk() and not _split(m.linkname):
        raise UnsafeArchive(f"archive entry {m.name!r} is a hardlink to the destination")
    if m.issym() and not allow_outside_symlinks and _link_leaves(parts[:-1], m.linkname):
        raise UnsafeArchive(f"archive entry {m.name!r} is a symlink to {m.linkname!r}, "
                            "outside the destination")
    return parts


class _HostTree:
    """Resolves paths inside ``root`` one component at a time, never leaving it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def resolve(self, parts: tuple[str, ...], entry: str, *,
                create: bool) -> tuple[Path, tuple[str, ...]] | None:
        """The real directory ``parts`` names (and its components), following symlinks
        that stay inside; missing ones are created (0700) when ``create``, else None."""
        try:
            done = resolve_inside(self.root, parts, create=create, mode=0o700)
        except (PathEscapes, TooManySymlinks):
            raise UnsafeArchive(f"archive entry {entry!r} goes through a symlink "
                                "that leaves the destination") from None
        except NotADirectory as exc:
            raise CopyError(f"cannot extract {entry!r}: {exc.shown!r} is not a directory") \
                from None
        return None if done is None else (self.root.joinpath(*done), done)


def extract_to_host(tar_bytes: bytes | BinaryIO, dest: Path, *,
                    allow_outside_symlinks: bool = False) -> None:
    """Extract an archive that came out of a guest into host directory ``dest``.

    The archive is hostile. Checked before anything is written: absolute
    names, ``..`` components, device nodes and other special files, and
    symlinks pointing outside ``dest`` (absolute, or climbing out) raise
    :class:`UnsafeArchive`. While extracting, every parent is resolved inside
    ``dest`` with ``lstat``: a symlink is followed only while it stays inside
    (one made by an earlier entry, or one already in ``dest``). Files belong to
    the caller: no ownership, set-uid/set-gid/sticky bits or extended
    attributes are taken from the archive (modes and mtimes are). A directory is not replaced by a
    file nor a file by a directory; other entries replace what is there.

    ``allow_outside_symlinks`` creates symlinks pointing outside as they are
    (what ``docker cp`` and tar do; the extraction itself never follows them).

    Raises:
        UnsafeArchive: a hostile entry (found before anything was written, or,
            for a symlink met on the way, at that entry).
        CopyError: a corrupt archive, or an entry in the way of another.
    """
    data = tar_bytes if isinstance(tar_bytes, bytes) else tar_bytes.read()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            members = tf.getmembers()
            checked = [(m, _check_entry(m, allow_outside_symlinks)) for m in members]
            if dest.exists() and not dest.is_dir():
                raise CopyError(f"{dest} is not a directory")
            dest.mkdir(parents=True, exist_ok=True)
            tree = _HostTree(dest)
            dir_meta: list[tuple[Path, int, float]] = []
            for m, parts in checked:
                if not parts:
                    continue  # the archive's root: dest keeps its own metadata
                _extract(tf, tree, m, parts, allow_outside_symlinks, dir_meta)
    except (tarfile.TarError, EOFError) as exc:
        raise CopyError(f"the archive is corrupt: {exc}") from exc
    # Directory modes and mtimes last: children changed the mtimes, and a
    # read-only directory would have refused its children. Deepest first.
    for path, mode, mtime in reversed(dir_meta):
        os.chmod(path, mode)
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def _extract(tf: tarfile.TarFile, tree: _HostTree, m: tarfile.TarInfo, parts: tuple[str, ...],
             allow_outside_symlinks: bool, dir_meta: list[tuple[Path, int, float]]) -> None:
    resolved = tree.resolve(parts[:-1], m.name, create=True)
    assert resolved is not None
    parent, real = resolved
    path = parent / parts[-1]
    try:
        st: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        st = None
    is_dir = st is not None and stat.S_ISDIR(st.st_mode)
    if m.isdir():
        if st is not None and not is_dir:
            raise CopyError(f"cannot extract directory {m.name!r} over the non-directory {path}")
        if st is None:
            os.mkdir(path, 0o700)
        dir_meta.append((path, m.mode & 0o777, m.mtime))
        return
    if is_dir:
        raise CopyError(f"cannot extract {m.name!r} over the directory {path}")
    if st is not None:
        os.unlink(path)
    if m.isreg():
        src = tf.extractfile(m)
        assert src is not None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, _FEED_CHUNK)
            os.fchmod(out.fileno(), m.mode & 0o777)
    elif m.issym():
        # Checked again from where it really lands (its parent may be a symlink).
        if not allow_outside_symlinks and _link_leaves(real, m.linkname):
            raise UnsafeArchive(f"archive entry {m.name!r} is a symlink to {m.linkname!r}, "
                                "outside the destination")
        os.symlink(m.linkname, path)
    elif m.islnk():
        tparts = _split(m.linkname)
        found = tree.resolve(tparts[:-1], m.name, create=False)
        target = found[0] / tparts[-1] if found is not None else None
        try:
            tst = os.lstat(target) if target is not None else None
        except FileNotFoundError:
            tst = None
        if target is None or tst is None:
            raise CopyError(f"archive entry {m.name!r} is a hardlink to the missing "
                            f"{m.linkname!r}")
        if stat.S_ISDIR(tst.st_mode):
            raise UnsafeArchive(f"archive entry {m.name!r} is a hardlink to a directory")
        os.link(target, path, follow_symlinks=False)
        return  # the target's metadata is the link's
    elif m.isfifo():
        os.mkfifo(path, 0o600)
        os.chmod(path, m.mode & 0o777)
    os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)
