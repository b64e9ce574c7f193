"""The ``ember`` command line: arguments in, library calls, output formatting out.

One module per command group (``run``, ``image``, ``machine``, ``ps``,
``logs``, ``exec``, ``cp``, ``system``), each with a ``register(subparsers)``. Kept thin and quick
to start: heavy modules are imported inside the command that needs them, so
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
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


def _parser() -> argparse.ArgumentParser:
    from ember.cli import cp, exec, image, logs, machine, ps, run, snapshot, system

    p = Parser(prog="ember", description="Run OCI images as micro virtual machines.")
    p.set_defaults(func=help_command(p))
    p.add_argument("--version", action="version", version=f"ember {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(metavar="COMMAND")
    for group in (run, system, image, machine, snapshot, ps, logs, exec, cp):
        group.register(sub)
    return p
