"""What the command groups share: exit statuses, error lines, argument types, the client.

Kept light: importing this module costs nothing but argparse and os; the SDK,
rich and the engine are imported by the commands that use them.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.sdk import Client
    from ember.util import Progress

#: Exit statuses of Ember itself, as Docker uses them: 125 when Ember fails,
#: 126 when the command cannot be run, 127 when it is not found.
EXIT_EMBER_FAILED = 125

Command = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """Usage errors like every other failure of Ember's: one line on stderr, exit 125.

    (argparse's own way is the whole usage block and exit 2.) Sub-parsers are
    made by ``add_subparsers`` with the parent's class, so this covers them all.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_EMBER_FAILED, f"ember: error: {message} (see `{self.prog} --help`)\n")


def help_command(parser: argparse.ArgumentParser) -> Command:
    """A command group named without an action (``ember image``): its help, exit 0."""
    def show(_: argparse.Namespace) -> int:
        parser.print_help()
        return 0
    return show


def error(msg: str) -> None:
    print(f"ember: error: {msg}", file=sys.stderr)


def progress(args: argparse.Namespace) -> Progress:
    from ember.util import no_progress, stderr_progress

    return no_progress if getattr(args, "quiet", False) else stderr_progress


def client() -> Client:
    """A client for the configured daemon; a local one is started on first use."""
    from ember.sdk import Client

    return Client(autostart=True)


def command_args(args: argparse.Namespace) -> list[str]:
    """The words after IMAGE or NAME, without the ``--`` that may separate them."""
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


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def each(names: Sequence[str], action: Any) -> int:
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
                error(str(exc))
                status = EXIT_EMBER_FAILED
    return status


def inspect_each(names: Sequence[str], get: Callable[[Any, str], Any],
                 doc: Callable[[Any], Any]) -> int:
    """``docker inspect``'s shape: a JSON array of the objects found (``doc(get(client,
    name))``), an error line for each of the others."""
    import json

    docs: list[Any] = []
    status = each(names, lambda c, name: docs.append(doc(get(c, name))))
    print(json.dumps(docs, indent=2))
    return status


def console() -> Any:
    from rich.console import Console

    # Piped output is for programs: no colour, and no wrapping at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 1000, highlight=False)


def pipe_safe(func: Command) -> Command:
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


# ---------------------------------------------------------------- argument types


def int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}")
        return n
    return parse


def count(value: str) -> int:
    if not value.isascii() or not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number")
    return int(value)


def volume_arg(value: str) -> Any:
    """``-v NAME:/PATH[:ro]``: a :class:`~ember.volumes.store.VolumeRequest`;
    ``-v HOSTDIR:/PATH[:ro]``: a :class:`~ember.volumes.shares.ShareMount` (the directory
    resolved against the cwd and checked here)."""
    from ember.volumes.store import VolumeError, parse_volume_flag

    try:
        return parse_volume_flag(value)
    except VolumeError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"-v {value!r}: ")) from None


def parse_size(value: str) -> int:
    """``--size``: bytes, or with a binary unit: ``512M``, ``10G``, ``1T`` (``K``, ``KiB``,
    ``GB`` alike: powers of 1024)."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if text[-1:] in ("K", "M", "G", "T"):
        scale = 1 << (10 * ("KMGT".index(text[-1]) + 1))
        text = text[:-1]
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a size (e.g. 512M, 10G, 1T)")
    return int(text) * scale


def size_between(value: str, lo: int, hi: int, what: str) -> int:
    """A size (``parse_size``) from ``lo`` to ``hi`` bytes; ``what`` names it in the error."""
    n = parse_size(value)
    if not lo <= n <= hi:
        raise argparse.ArgumentTypeError(f"{value!r}: {what} must be between {lo >> 20}M and "
                                         f"{hi >> 40}T")
    return n


def rootfs_size_arg(value: str) -> int:
    """``--rootfs-size``: a size a root layer may have."""
    from ember.volumes.layer import MAX_SIZE, MIN_SIZE

    return size_between(value, MIN_SIZE, MAX_SIZE, "a root layer's size")


def port_number(value: str) -> int:
    n = count(value.removesuffix("/tcp"))
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (1-65535)")
    return n
