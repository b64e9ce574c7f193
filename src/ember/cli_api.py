"""The CLI commands that drive the daemon through the SDK: create, start, ps, exec, cp...

``register(subparsers)`` adds them to ``ember``'s parser; :func:`run_detached`
is ``ember run -d``. Errors raise (the SDK's are :class:`EmberError` s), and
``ember.cli.main`` prints them as one line with exit status 125; ``ember
exec`` exits with the command's own status. The daemon is started on demand.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import posixpath
import shutil
import signal
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.errors import EmberError

if TYPE_CHECKING:
    import tarfile
    from datetime import datetime

    from ember.api.models import Machine
    from ember.sdk import Client, ExecEvent, MachineHandle

EXIT_EMBER_FAILED = 125
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


# ---------------------------------------------------------------- helpers


def client() -> Client:
    """A client for the configured daemon; a local one is started on first use."""
    from ember.sdk import Client

    return Client(autostart=True)


def _error(msg: str) -> None:
    print(f"ember: error: {msg}", file=sys.stderr)


def _command(args: argparse.Namespace) -> list[str]:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    return command


def parse_env(entries: Iterable[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """``-e K=V`` as given; ``-e K`` takes K's value from this environment (skipped if unset)."""
    environ = dict(os.environ) if environ is None else environ
    out: dict[str, str] = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not key:
            raise EmberError(f"-e {entry!r}: expected NAME=VALUE or NAME")
        if sep:
            out[key] = value
        elif key in environ:
            out[key] = environ[key]
    return out


def parse_memory(value: str) -> int:
    """``-m``: MiB, or with a unit: ``512m``, ``2g``."""
    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    scale = 1
    if text[-1:] in ("m", "g"):
        scale = 1024 if text[-1] == "g" else 1
        text = text[:-1]
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a size in MiB (e.g. 512, 512m, 2g)")
    return int(text) * scale


def entrypoint_arg(value: str | None) -> list[str] | None:
    """``--entrypoint X`` replaces the image's; ``--entrypoint ''`` clears it (as in Docker)."""
    if value is None:
        return None
    return [value] if value else []


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _each(names: Sequence[str], action: Any) -> int:
    """Apply ``action(client, name)`` to every name; errors are reported and counted."""
    status = 0
    with client() as c:
        for name in names:
            try:
                action(c, name)
            except EmberError as exc:
                from ember.sdk import DaemonUnavailable

                if isinstance(exc, DaemonUnavailable):
                    raise
                _error(str(exc))
                status = EXIT_EMBER_FAILED
    return status


def _machine_json(info: Machine) -> str:
    return json.dumps(info.model_dump(mode="json"), indent=2)


# ---------------------------------------------------------------- create / run -d


def _create(c: Client, args: argparse.Namespace, *, start: bool) -> MachineHandle:
    from ember.sdk import parse_port

    image = args.image
    if ("/" in image or image.endswith(".tar")) and os.path.exists(image):
        # a path, as `ember run` takes it; the daemon reads it, so it goes absolute
        imported = c.images.import_path(os.path.abspath(image))
        image = imported.tags[0] if imported.tags else imported.short_id
    command = _command(args)
    m = c.machines.create(
        image, name=args.name, cpus=args.cpus, memory_mib=args.memory,
        env=parse_env(args.env), cmd=command or None, entrypoint=entrypoint_arg(args.entrypoint),
        workdir=args.workdir, user=args.user, hostname=args.hostname,
        ports=[parse_port(p) for p in args.publish],
        network=args.network, restart=args.restart, start=False)
    if start:
        try:
            m.start()
        except EmberError as exc:
            raise EmberError(f"{exc} (machine {m.name} was created but did not start; see "
                             f"`ember logs --console {m.name}`)") from None
    return m


def cmd_create(args: argparse.Namespace) -> int:
    with client() as c:
        m = _create(c, args, start=False)
    print(_machine_json(m.info) if args.json else m.name)
    return 0


def run_detached(args: argparse.Namespace) -> int:
    """``ember run -d``: create and start a machine under the daemon, print its name."""
    if args.interactive or args.tty:
        raise EmberError("-d runs the machine in the background: drop -i/-t "
                         "(then `ember exec -it NAME sh`)")
    if getattr(args, "accel", None):
        raise EmberError("with -d the daemon chooses the accelerator: use `ember serve --accel`")
    with client() as c:
        m = _create(c, args, start=True)
    print(m.name)
    return 0


# ---------------------------------------------------------------- lifecycle


def cmd_start(args: argparse.Namespace) -> int:
    return _each(args.names, lambda c, n: (c.machines.get(n).start(), print(n)))


def cmd_stop(args: argparse.Namespace) -> int:
    return _each(args.names, lambda c, n: (c.machines.get(n).stop(args.time), print(n)))


def cmd_kill(args: argparse.Namespace) -> int:
    return _each(args.names, lambda c, n: (c.machines.get(n).kill(), print(n)))


def cmd_pause(args: argparse.Namespace) -> int:
    return _each(args.names, lambda c, n: (c.machines.get(n).pause(), print(n)))


def cmd_resume(args: argparse.Namespace) -> int:
    return _each(args.names, lambda c, n: (c.machines.get(n).resume(), print(n)))


def cmd_rm(args: argparse.Namespace) -> int:
    return _each(args.names, lambda c, n: (c.machines.get(n).remove(args.force), print(n)))


# ---------------------------------------------------------------- ps / inspect / port


def _ago(stamp: str | None, now: datetime | None = None) -> str:
    from datetime import UTC, datetime

    if not stamp:
        return ""
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    secs = int(((now or datetime.now(UTC)) - then).total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if secs >= size:
            n = secs // size
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "just now" if secs < 5 else f"{secs} seconds ago"


def format_ports(info: Machine) -> str:
    return ", ".join(f"{p.host_ip}:{p.host_port}->{p.guest_port}/{p.protocol}"
                     for p in info.ports)


def _state(info: Machine) -> str:
    state = info.state.value
    if info.exit_code is not None and state in ("stopped", "crashed"):
        return f"{state} ({info.exit_code})"
    return state


def _command_text(info: Machine) -> str:
    argv = [*(info.entrypoint or []), *(info.cmd or [])]
    text = " ".join(argv) if argv else "(image default)"
    return text if len(text) <= 40 else text[:39] + "…"


def cmd_ps(args: argparse.Namespace) -> int:
    with client() as c:
        machines = [m.info for m in c.machines.list(all=args.all)]
    if args.json:
        print(json.dumps([m.model_dump(mode="json") for m in machines], indent=2))
        return 0
    if args.quiet:
        for m in machines:
            print(m.name)
        return 0
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "ID", "IMAGE", "STATE", "CREATED", "PORTS", "COMMAND"):
        table.add_column(col, no_wrap=True, overflow="fold")
    for m in machines:
        table.add_row(m.name, m.id[:12], m.image, _state(m), _ago(m.created_at),
                      format_ports(m), _command_text(m))
    console = _console()
    with console.capture() as captured:
        console.print(table)
    for line in captured.get().splitlines():
        print(line.rstrip())
    return 0


def _console() -> Any:
    from rich.console import Console

    # Piped output is for programs: no colour, and no wrapping at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 1000, highlight=False)


def cmd_inspect(args: argparse.Namespace) -> int:
    found: list[dict[str, Any]] = []

    def get(c: Client, name: str) -> None:
        found.append(c.machines.get(name).info.model_dump(mode="json"))

    status = _each(args.names, get)
    doc: Any = found[0] if len(args.names) == 1 and found else found
    if found or len(args.names) > 1:
        if args.json or not sys.stdout.isatty():
            print(json.dumps(doc, indent=2))
        else:
            _console().print_json(data=doc)
    return status


def cmd_port(args: argparse.Namespace) -> int:
    with client() as c:
        info = c.machines.get(args.name).info
    ports = [p for p in info.ports if args.port is None or p.guest_port == args.port]
    if args.port is not None and not ports:
        raise EmberError(f"machine {info.name} does not publish guest port {args.port}")
    if args.json:
        print(json.dumps([p.model_dump(mode="json") for p in ports], indent=2))
    else:
        for p in ports:
            print(f"{p.guest_port}/{p.protocol} -> {p.host_ip}:{p.host_port}")
    return 0


# ---------------------------------------------------------------- exec


def _stdin_is_data() -> bool:
    """Piped or redirected stdin is input for the command; a terminal or /dev/null is not."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)


def cmd_exec(args: argparse.Namespace) -> int:
    command = _command(args)
    if not command:
        raise EmberError("exec needs a command: ember exec NAME -- CMD [ARGS...]")
    opts = {"env": parse_env(args.env), "workdir": args.workdir, "user": args.user,
            "timeout": args.timeout}
    with client() as c:
        m = c.machines.get(args.name)
        if args.interactive or args.tty:
            return _exec_session(m, command, opts, tty=args.tty, stdin=args.interactive)
        stdin: bytes | None = sys.stdin.buffer.read() if _stdin_is_data() else None
        if stdin is not None:
            try:
                stdin.decode()
            except UnicodeDecodeError:  # the buffered body is text: binary goes over the socket
                return _exec_session(m, command, opts, tty=False, stdin=True,
                                     preread=stdin)
        return _exit_status(_write_events(m.exec_stream(command, stdin=stdin, **opts)))


def _write_events(events: Iterable[ExecEvent]) -> ExecEvent | None:
    last = None
    for ev in events:
        if ev.type == "stdout":
            _write(1, ev.data)
        elif ev.type == "stderr":
            _write(2, ev.data)
        elif ev.final:
            last = ev
    return last


def _exit_status(ev: ExecEvent | None) -> int:
    if ev is None:
        raise EmberError("the exec stream ended before the process exited")
    if ev.type == "error":
        _error(ev.message or "exec failed")
        return ev.exit_code if ev.exit_code is not None else EXIT_EMBER_FAILED
    if ev.timed_out:
        _error("the command timed out and was killed")
    return ev.exit_code if ev.exit_code is not None else EXIT_EMBER_FAILED


def _exec_session(m: MachineHandle, command: list[str], opts: dict[str, Any], *, tty: bool,
                  stdin: bool, preread: bytes | None = None) -> int:
    """Interactive exec over the WebSocket: live stdin, a raw terminal with ``-t``."""
    if tty and not os.isatty(0):
        raise EmberError("the input device is not a TTY: drop -t (use -i to pipe stdin)")
    session = m.exec_session(command, tty=tty, **opts)
    with session, _raw_terminal(session if tty else None):
        if stdin:
            import threading

            threading.Thread(target=_pump_stdin, args=(session, preread), daemon=True,
                             name="ember-stdin").start()
        return _exit_status(_write_events(session))


def _pump_stdin(session: Any, preread: bytes | None) -> None:
    if preread:
        session.send(preread)
    while True:
        try:
            data = os.read(0, 65536)
        except OSError:
            data = b""
        if not data:
            session.close_stdin()
            return
        session.send(data)


@contextlib.contextmanager
def _raw_terminal(session: Any) -> Iterator[None]:
    """Local terminal in raw mode, its size sent now and on every SIGWINCH; restored after."""
    if session is None:
        yield
        return
    import termios
    import tty

    def resize(*_: object) -> None:
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(0)
            if size.lines and size.columns:  # a fresh pty may not know its size
                session.resize(size.lines, size.columns)

    saved = termios.tcgetattr(0)
    old_handler = signal.signal(signal.SIGWINCH, resize)
    resize()
    tty.setraw(0, termios.TCSANOW)  # not TCSAFLUSH: keep what was typed ahead
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, old_handler)


# ---------------------------------------------------------------- logs


def cmd_logs(args: argparse.Namespace) -> int:
    source = "console" if args.console else "output"
    with client() as c:
        m = c.machines.get(args.name)
        for chunk in m.logs(source=source, follow=args.follow, tail=args.tail):
            _write(1, chunk)
    return 0


# ---------------------------------------------------------------- cp


def parse_cp_arg(arg: str) -> tuple[str | None, str]:
    """``NAME:PATH`` -> (NAME, PATH); anything else is a host path (None, PATH).

    As with ``docker cp``, a host path containing ``:`` can be written ``./a:b``;
    a path starting with ``/``, ``.`` or ``~`` is always the host's.
    """
    if arg == "-" or arg.startswith(("/", ".", "~")):
        return None, arg
    name, sep, path = arg.partition(":")
    if sep and name and set(name) <= _NAME_CHARS:
        return name, path
    return None, arg


def cmd_cp(args: argparse.Namespace) -> int:
    src_name, src = parse_cp_arg(args.src)
    dst_name, dst = parse_cp_arg(args.dst)
    if src_name and dst_name:
        raise EmberError("copying between machines is not supported: copy to the host first")
    if not src_name and not dst_name:
        raise EmberError("one of SRC and DST must be a machine path, NAME:PATH")
    with client() as c:
        if src_name:
            if not src:
                raise EmberError(f"{args.src!r}: the machine path is empty")
            m = c.machines.get(src_name)
            copy_from_guest(m.get_archive(src), src, dst)
        else:
            assert dst_name is not None
            if not dst:
                raise EmberError(f"{args.dst!r}: the machine path is empty")
            copy_to_guest(c.machines.get(dst_name), src, dst)
    return 0


def copy_from_guest(tar_bytes: bytes, guest_path: str, dst: str) -> None:
    """Put the archive of ``guest_path`` at host path ``dst`` (``-``: the tar on stdout).

    Into ``dst`` when it is a directory, else as ``dst`` (the copy takes its
    name). The archive is checked by ``ember.files.extract_to_host``: absolute
    names, ``..``, device nodes and symlinked escapes are refused.
    """
    from ember.files import extract_to_host

    if dst == "-":
        _write(1, tar_bytes)
        return
    dest = Path(os.path.expanduser(dst))
    whole_root = posixpath.normpath("/" + guest_path.lstrip("/")) == "/"
    if dest.is_dir() or whole_root:
        extract_to_host(tar_bytes, dest, allow_outside_symlinks=True)
        return
    if dst.endswith("/"):
        raise EmberError(f"destination directory {dst} does not exist")
    parent = dest.parent
    if not parent.is_dir():
        raise EmberError(f"{parent} is not a directory")
    import tempfile

    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".ember-cp-"))
    try:
        extract_to_host(tar_bytes, tmp, allow_outside_symlinks=True)
        entries = os.listdir(tmp)
        if len(entries) != 1:
            raise EmberError(f"expected one entry in the archive of {guest_path}, "
                             f"got {len(entries)}")
        got = tmp / entries[0]
        if got.is_dir() and not got.is_symlink() and dest.exists():
            raise EmberError(f"cannot copy directory {guest_path} onto file {dst}")
        os.replace(got, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _owned_by_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def host_tar(src: Path, arcname: str) -> bytes:
    """A tar of host file or directory ``src`` named ``arcname``, owned by root in the guest."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(src, arcname=arcname, recursive=True, filter=_owned_by_root)
    return buf.getvalue()


def _guest_is_dir(m: MachineHandle, path: str) -> bool:
    with contextlib.suppress(EmberError):
        return m.exec(["test", "-d", path], timeout=30).exit_code == 0
    return False


def copy_to_guest(m: MachineHandle, src: str, guest_path: str) -> None:
    """Copy host ``src`` (``-``: a tar on stdin) to ``guest_path`` in machine ``m``.

    Into ``guest_path`` when it ends with ``/`` or is a directory in the guest,
    else as ``guest_path`` (the copy takes its name; its directory is made).
    """
    gpath = guest_path if guest_path.startswith("/") else "/" + guest_path
    if src == "-":
        m.put_archive(gpath, sys.stdin.buffer.read())
        return
    path = Path(os.path.expanduser(src))
    if not os.path.lexists(path):
        raise EmberError(f"{src}: no such file or directory")
    base = Path(os.path.abspath(path)).name
    if not base:
        raise EmberError(f"cannot copy {src}: name a file or directory")
    if gpath.endswith("/") or _guest_is_dir(m, gpath):
        m.put_archive(gpath, host_tar(path, base))
    else:
        parent, name = posixpath.split(posixpath.normpath(gpath))
        m.put_archive(parent or "/", host_tar(path, name))


# ---------------------------------------------------------------- parser


def _pipe_safe(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``ember logs x | head``: a reader that goes away ends the command quietly."""
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush at exit
            os.close(devnull)
            return 128 + signal.SIGPIPE
    return run


def register(sub: Any) -> None:
    """Add the daemon-backed commands to ``ember``'s subparsers."""
    c = sub.add_parser("create", help="create a machine under the daemon (not started)",
                       description="Create a machine from IMAGE under the daemon and print its "
                       "name; `ember start NAME` boots it.")
    add_create_options(c)
    c.add_argument("--json", action="store_true", help="print the machine's record as JSON")
    c.add_argument("image", metavar="IMAGE")
    c.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    c.set_defaults(func=_pipe_safe(cmd_create))

    for name, func, text in (("start", cmd_start, "boot machines"),
                             ("kill", cmd_kill, "power machines off at once"),
                             ("pause", cmd_pause, "freeze machines' vCPUs"),
                             ("resume", cmd_resume, "unfreeze paused machines")):
        p = sub.add_parser(name, help=text)
        p.add_argument("names", nargs="+", metavar="NAME")
        p.set_defaults(func=_pipe_safe(func))
    p = sub.add_parser("stop", help="stop machines: SIGTERM, then power off after a timeout")
    p.add_argument("-t", "--time", type=float, default=10.0, metavar="SECONDS",
                   help="seconds to wait after SIGTERM before powering off (default 10)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=_pipe_safe(cmd_stop))
    p = sub.add_parser("rm", help="remove machines")
    p.add_argument("-f", "--force", action="store_true", help="remove running machines too")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=_pipe_safe(cmd_rm))

    p = sub.add_parser("ps", help="list machines")
    p.add_argument("-a", "--all", action="store_true", help="also stopped and created ones")
    p.add_argument("-q", "--quiet", action="store_true", help="names only")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_pipe_safe(cmd_ps))

    p = sub.add_parser("inspect", help="show machines' records as JSON")
    p.add_argument("--json", action="store_true", help="plain JSON (the default when piped)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=_pipe_safe(cmd_inspect))

    p = sub.add_parser("port", help="list a machine's published ports")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("name", metavar="NAME")
    p.add_argument("port", nargs="?", type=_port_number, metavar="GUEST_PORT")
    p.set_defaults(func=_pipe_safe(cmd_port))

    p = sub.add_parser("exec", help="run a command in a running machine",
                       description="Run CMD in machine NAME; exit with its status. Piped "
                       "stdin is passed to it; -i streams stdin live, -t gives it a terminal.")
    p.add_argument("-i", "--interactive", action="store_true", help="stream stdin live")
    p.add_argument("-t", "--tty", action="store_true", help="run on a guest pseudo-terminal")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K[=V]",
                   help="set an environment variable (repeatable)")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the guest")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]", help="user to run as")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="kill the command after this many seconds")
    p.add_argument("name", metavar="NAME")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=_pipe_safe(cmd_exec))

    p = sub.add_parser("logs", help="print a machine's output (or its console)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until it stops")
    p.add_argument("--console", action="store_true", help="the serial console instead")
    p.add_argument("--tail", type=_count, default=0, metavar="N",
                   help="only the last N lines (default: all)")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_pipe_safe(cmd_logs))

    p = sub.add_parser("cp", help="copy files between a machine and the host",
                       description="ember cp NAME:SRC HOSTDST | ember cp HOSTSRC NAME:DST. "
                       "- as the host side is a tar stream on stdin/stdout. A directory "
                       "destination receives SRC inside it; otherwise the copy takes DST's "
                       "name. End a machine path with / to mean a directory.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.set_defaults(func=_pipe_safe(cmd_cp))


def add_create_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="machine name (default: generated)")
    p.add_argument("--cpus", type=_count, default=1, help="vCPUs (default 1)")
    p.add_argument("-m", "--memory", type=parse_memory, default=256, metavar="MIB",
                   help="guest memory in MiB, or 512m / 2g (default 256)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K[=V]",
                   help="set an environment variable; K alone passes this shell's value")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the guest")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]", help="user to run as")
    p.add_argument("--entrypoint", help="override the image's entrypoint ('' clears it)")
    p.add_argument("--hostname", help="guest hostname")
    p.add_argument("-p", "--publish", action="append", default=[],
                   metavar="[IP:]HOST:GUEST",
                   help="publish a guest TCP port on the host (GUEST alone: any free port)")
    p.add_argument("--network", choices=("user", "none"), default="user",
                   help="user: NAT with outbound access (default); none: no network")
    p.add_argument("--restart", choices=("no", "on-failure", "always"), default="no",
                   help="restart policy (default no)")


def _count(value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number")
    return int(value)


def _port_number(value: str) -> int:
    n = _count(value.removesuffix("/tcp"))
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1-65535)")
    return n
