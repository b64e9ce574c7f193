"""The host's own commands: ``ember doctor``, ``setup``, ``serve`` and ``version``."""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

from ember.cli.common import EXIT_EMBER_FAILED, error, progress

#: Seconds ``ember version`` waits for a daemon's answer.
VERSION_TIMEOUT = 10.0


def cmd_doctor(args: argparse.Namespace) -> int:
    from ember.host.doctor import doctor_report, format_report

    report = doctor_report(args.accel)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0 if report["ok"] else 1


def cmd_setup(args: argparse.Namespace) -> int:
    from ember.host.setup import setup

    setup(install_packages=not args.no_packages, progress=progress(args))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ember.daemon.server import serve

    return serve(tcp=args.tcp, token=args.token, accel=args.accel, verbose=args.verbose)


def cmd_version(args: argparse.Namespace) -> int:
    """This client's version and, when one answers, the daemon's; never starts one."""
    from ember import __version__
    from ember.api.models import API_VERSION
    from ember.sdk import APIError, Client, DaemonUnavailable
    from ember.sdk.daemon import connectable

    client = {"version": __version__, "api": API_VERSION,
              "python": platform.python_version()}
    daemon: dict[str, Any] | None = None
    failed: str | None = None
    with Client(timeout=VERSION_TIMEOUT) as c:
        where = c.endpoint.describe()
        try:
            v = c.version()
            daemon = {**v.model_dump(), "address": where}
        except DaemonUnavailable as exc:
            sock = c.endpoint.socket_path
            if sock is None or connectable(sock):  # a daemon is there, or one was named
                failed = str(exc)
        except APIError as exc:  # it answered, but not with its version (401: the token)
            failed = f"the daemon at {where} answered: {exc}"
    if args.json:
        print(json.dumps({"client": client, "daemon": daemon}, indent=2))
    else:
        print(f"client: ember {client['version']}, API {client['api']}, "
              f"Python {client['python']}")
        if daemon is not None:
            print(f"daemon: ember {daemon['version']}, API {daemon['api']}, accelerator "
                  f"{daemon['accel']} ({daemon['accel_reason']}), at {where}")
        elif failed is None:
            print(f"daemon: not running (nothing answers at {where})")
    if failed is not None:
        error(failed)
        return EXIT_EMBER_FAILED
    return 0


def register(sub: Any) -> None:
    d = sub.add_parser("doctor", help="report what this host can do and what is built")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None)
    d.set_defaults(func=cmd_doctor)

    s = sub.add_parser("setup", help="install host packages and build the guest kernel and agent")
    s.add_argument("--no-packages", action="store_true", help="do not run apt-get")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_setup)

    sv = sub.add_parser("serve", help="run the daemon (the CLI starts it by itself when needed)",
                        description="Serve the REST API on a Unix socket in the data dir "
                        "(mode 0600) and, with --tcp, on TCP with a bearer token.")
    sv.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP (token required)")
    sv.add_argument("--token", help="bearer token for TCP (default: $EMBER_TOKEN, else "
                    "DATA_DIR/token, created when missing)")
    sv.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None)
    sv.set_defaults(func=cmd_serve)

    v = sub.add_parser("version", help="show the client's and the daemon's versions",
                       description="The client's version and, if a daemon answers, its "
                       "version, API and accelerator. Does not start a daemon.")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=cmd_version)
