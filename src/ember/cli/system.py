"""The host's own commands: ``ember doctor``, ``ember setup`` and ``ember serve``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ember.cli.common import progress


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
