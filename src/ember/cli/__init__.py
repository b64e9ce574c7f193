"""The ``ember`` command line: arguments in, library calls, output formatting out.

One module per command group (``run``, ``image``, ``volume``, ``machine``,
``ps``, ``logs``, ``exec``, ``cp``, ``system``), each with a ``register(subparsers)``.
Kept thin and quick to start: heavy modules are imported inside the command that needs them, so
``ember run`` pays only for what it uses.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ember import __version__
from ember.cli.common import EXIT_EMBER_FAILED, Parser, error, help_command
from ember.errors import EmberError, MachineCrashed

__all__ = ["EXIT_EMBER_FAILED", "main"]


#: Which module registers each command, so a command builds (and imports) only its own
#: group's parser: ``ember run`` starts its QEMU ~40 ms sooner. Checked against the
#: modules' ``register`` by the CLI tests.
COMMANDS: dict[str, str] = {
    "run": "run",
    **dict.fromkeys(("doctor", "serve", "setup", "token", "version"), "system"),
    **dict.fromkeys(("commit", "image"), "image"),
    "volume": "volume",
    **dict.fromkeys(("create", "kill", "pause", "rename", "restart", "resume", "rm", "start",
                     "stop", "update", "wait"), "machine"),
    **dict.fromkeys(("clone", "snapshot"), "snapshot"),
    **dict.fromkeys(("inspect", "port", "ps"), "ps"),
    "logs": "logs",
    "exec": "exec",
    "cp": "cp",
    **dict.fromkeys(("login", "logout", "pull"), "pull"),
    **dict.fromkeys(("diff", "events", "stats", "top"), "stats"),
    **dict.fromkeys(("completion", "__complete"), "completion"),
}
GROUPS = ("run", "system", "image", "volume", "pull", "machine", "snapshot", "ps", "stats",
          "logs", "exec", "cp", "completion")


def entry() -> None:
    """The ``ember`` console script: :func:`main`, then an exit that skips the
    interpreter's teardown (tens of ms of module and thread clean-up that nothing
    here needs once output is flushed)."""
    import os

    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = code or 128 + 13
    logging.shutdown()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(_command_of(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="ember: %(levelname)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except MachineCrashed as exc:
        error(str(exc))
        if exc.console_tail:
            print("--- last lines of the guest console ---", file=sys.stderr)
            print(exc.console_tail, file=sys.stderr)
        return EXIT_EMBER_FAILED
    except EmberError as exc:
        code = getattr(exc, "code", None)
        error(str(exc))
        return code if isinstance(code, int) and code in (126, 127) else EXIT_EMBER_FAILED
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except BrokenPipeError:  # `ember ... | head`: the reader went away, so do we
        import os
        import signal

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush at exit
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except Exception as exc:  # a bug: still one line, the traceback only with -v
        logging.getLogger("ember").debug("internal error", exc_info=True)
        error(f"internal error: {type(exc).__name__}: {exc} (run with -v for details)")
        return EXIT_EMBER_FAILED


def _command_of(argv: Sequence[str]) -> str | None:
    """The command word of ``argv`` (the first word not an option), if it is a known one."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser: of every command group, or of only the group of ``command``."""
    import importlib

    p = Parser(prog="ember", description="Run OCI images as micro virtual machines.")
    p.set_defaults(func=help_command(p))
    p.add_argument("--version", action="version", version=f"ember {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(metavar="COMMAND")
    for group in (COMMANDS[command],) if command is not None else GROUPS:
        importlib.import_module(f"ember.cli.{group}").register(sub)
    return p
