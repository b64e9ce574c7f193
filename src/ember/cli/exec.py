"""``ember exec``: run more programs in a running machine, buffered, streamed or live."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import stat
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ember.cli.common import (
    EXIT_EMBER_FAILED,
    client,
    command_args,
    error,
    parse_env,
    pipe_safe,
    write_all,
)
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.sdk import ExecSession, MachineHandle
    from ember.sdk.execevent import ExecEvent


def _stdin_is_data() -> bool:
    """Piped or redirected stdin is input for the command; a terminal or /dev/null is not."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)


#: Piped stdin up to this size is sent in the request itself (as text, when it is
#: UTF-8); more is streamed over the exec WebSocket as it is read, in bounded memory.
STDIN_INLINE = 1 << 20
_READ_SIZE = 256 << 10


def cmd_exec(args: argparse.Namespace) -> int:
    command = command_args(args)
    if not command:
        raise EmberError("exec needs a command: ember exec NAME -- CMD [ARGS...]")
    opts = {"env": parse_env(args.env), "workdir": args.workdir, "user": args.user,
            "timeout": args.timeout}
    if args.detach:
        if args.interactive or args.tty or args.timeout is not None:
            raise EmberError("-d leaves the command running on its own: drop -i, -t and "
                             "--timeout")
        return _detach(args.name, command, opts)
    head, ended = b"", True
    if not (args.interactive or args.tty):
        # the common case, on the CLI's lean path: no SDK, one streamed request
        if not _stdin_is_data():
            return _exit_status(_write_events(_lean_stream(args.name, command, opts, None)))
        head, ended = _read_head(STDIN_INLINE)
        if ended:
            try:
                text = head.decode()
            except UnicodeDecodeError:  # the request's stdin is text: binary goes over the socket
                pass
            else:
                return _exit_status(_write_events(_lean_stream(args.name, command, opts,
                                                               text)))
    with client() as c:
        m = c.machines.get(args.name)
        if args.interactive or args.tty:
            return _exec_session(m, command, opts, tty=args.tty, stdin=args.interactive)
        return _exec_session(m, command, opts, tty=False, stdin=True, head=head,
                             rest=not ended)


def _detach(name: str, command: list[str], opts: dict[str, Any]) -> int:
    """``ember exec -d``: started in the guest and left running; nothing printed (Docker's)."""
    from ember.cli.wire import Wire, quote_name

    with Wire() as w:
        w.call("POST", f"/v1/machines/{quote_name(name)}/exec/detach", _body(command, opts))
    return 0


def _body(command: list[str], opts: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"cmd": command, "env": opts["env"]}
    for key in ("workdir", "user", "timeout"):
        if opts[key] is not None:
            body[key] = opts[key]
    return body


def _lean_stream(name: str, command: list[str], opts: dict[str, Any],
                 stdin: str | None) -> Iterator[ExecEvent]:
    """``POST /v1/machines/NAME/exec/stream`` over ``cli/wire.py``: the events as they come."""
    import json

    from ember.cli.wire import Wire, quote_name
    from ember.sdk.execevent import ExecEvent

    body = _body(command, opts)
    if stdin is not None:
        body["stdin"] = stdin
    with Wire() as w, w.lines("POST", f"/v1/machines/{quote_name(name)}/exec/stream",
                              body) as lines:
        for line in lines:
            try:
                doc = json.loads(line)
            except ValueError:
                raise EmberError("the daemon sent a malformed exec event") from None
            yield ExecEvent.from_json(doc)


def _read_head(limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of stdin, and whether stdin ended within them."""
    buf = bytearray()
    while len(buf) < limit:
        data = _read_stdin(limit - len(buf))
        if not data:
            return bytes(buf), True
        buf += data
    return bytes(buf), False


def _read_stdin(size: int) -> bytes:
    try:
        return os.read(0, size)
    except OSError:  # e.g. EIO: treated as the end of the input
        return b""


def _write_events(events: Iterable[ExecEvent]) -> ExecEvent | None:
    last = None
    for ev in events:
        if ev.type == "stdout":
            write_all(1, ev.data)
        elif ev.type == "stderr":
            write_all(2, ev.data)
        elif ev.final:
            last = ev
    return last


def _exit_status(ev: ExecEvent | None) -> int:
    if ev is None:
        raise EmberError("the exec stream ended before the process exited")
    if ev.type == "error":
        error(ev.message or "exec failed")
        return ev.exit_code if ev.exit_code is not None else EXIT_EMBER_FAILED
    if ev.timed_out:
        error("the command timed out and was killed")
    if ev.truncated:  # what we printed is incomplete: no script may take it for the output
        error("the command's output was cut short: it was not read for 10 s (the daemon "
              f"dropped the rest; the command exited {ev.exit_code})")
        return EXIT_EMBER_FAILED
    return ev.exit_code if ev.exit_code is not None else EXIT_EMBER_FAILED


def _exec_session(m: MachineHandle, command: list[str], opts: dict[str, Any], *, tty: bool,
                  stdin: bool, head: bytes = b"", rest: bool = True) -> int:
    """Exec over the WebSocket: live stdin (``head``, then the rest of fd 0 if ``rest``),
    a raw terminal with ``-t``."""
    if tty and not os.isatty(0):
        raise EmberError("the input device is not a TTY: drop -t (use -i to pipe stdin)")
    session = m.exec_session(command, tty=tty, **opts)
    with session, _raw_terminal(session if tty else None):
        if stdin:
            import threading

            threading.Thread(target=_pump_stdin, args=(session, head, rest), daemon=True,
                             name="ember-stdin").start()
        return _exit_status(_write_events(session))


def _pump_stdin(session: ExecSession, head: bytes, rest: bool) -> None:
    """Stdin to the session, one read at a time: ``send`` blocks while the command reads
    slower than we do, so at most one read is held here."""
    session.send(head)
    while rest and session.result is None:  # once the command has exited, stop reading
        data = _read_stdin(_READ_SIZE)
        if not data:
            break
        session.send(data)
    session.close_stdin()


@contextlib.contextmanager
def _raw_terminal(session: ExecSession | None) -> Iterator[None]:
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


def register(sub: Any) -> None:
    p = sub.add_parser("exec", help="run a command in a running machine",
                       description="Run CMD in machine NAME; exit with its status. Piped "
                       "stdin (any size) is passed to it; -i streams stdin live, -t gives it "
                       "a terminal.")
    p.add_argument("-i", "--interactive", action="store_true", help="stream stdin live")
    p.add_argument("-t", "--tty", action="store_true", help="run on a guest pseudo-terminal")
    p.add_argument("-d", "--detach", action="store_true",
                   help="start the command and leave it running (its output is dropped)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K[=V]",
                   help="set an environment variable (repeatable)")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the guest")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]", help="user to run as")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="kill the command after this many seconds (then exit 137)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=pipe_safe(cmd_exec))
