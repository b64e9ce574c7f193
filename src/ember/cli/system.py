"""The host's own commands: ``ember doctor``, ``setup``, ``serve``, ``token`` and
``version``."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

from ember.cli.common import EXIT_EMBER_FAILED, error, help_command, progress

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

    return serve(tcp=args.tcp, token=args.token, accel=args.accel, verbose=args.verbose,
                 tls_cert=args.tls_cert, tls_key=args.tls_key, insecure_tcp=args.insecure_tcp)


def cmd_token_rotate(args: argparse.Namespace) -> int:
    """A new token in the data dir's file; the token itself only with ``--show`` (stdout)."""
    from ember.daemon.server import rotate_token

    path, token = rotate_token()
    if args.show:
        print(token)
    print(f"ember: wrote a new bearer token to {path} (mode 0600)", file=sys.stderr)
    print("ember: a daemon whose token is this file's wants the new one from its next TCP "
          f"request on (the old one no longer works): EMBER_TOKEN=$(cat {path})",
          file=sys.stderr)
    if os.environ.get("EMBER_TOKEN"):
        print("ember: note: $EMBER_TOKEN is set here; a daemon started with it (or with "
              "--token) does not read the file, and keeps its token", file=sys.stderr)
    return 0


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
                        "(mode 0600) and, with --tcp, on TCP with a bearer token, over TLS "
                        "(--tls-cert, --tls-key) or, with --insecure-tcp, plain HTTP.")
    sv.add_argument("--tcp", metavar="HOST:PORT", help="also listen on TCP (token required; "
                    "TLS or --insecure-tcp required)")
    sv.add_argument("--tls-cert", metavar="FILE", help="the TCP listener's certificate (PEM, "
                    "with any intermediates)")
    sv.add_argument("--tls-key", metavar="FILE", help="its private key (PEM, unencrypted)")
    sv.add_argument("--insecure-tcp", action="store_true", help="serve TCP as plain HTTP, "
                    "without TLS: the token and all traffic unencrypted")
    sv.add_argument("--token", help="bearer token for TCP (default: $EMBER_TOKEN, else "
                    "DATA_DIR/token, created when missing, and read again when it changes)")
    sv.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None)
    sv.set_defaults(func=cmd_serve)

    tk = sub.add_parser("token", help="manage the TCP listener's bearer token",
                        description="The bearer token of `ember serve --tcp`, kept in "
                        "DATA_DIR/token.")
    tk.set_defaults(func=help_command(tk))
    tks = tk.add_subparsers(metavar="ACTION")
    rot = tks.add_parser("rotate", help="write a new random token to DATA_DIR/token",
                         description="Write a new random token to DATA_DIR/token (mode 0600, "
                         "replaced atomically). A daemon reading that file uses the new "
                         "token from its next TCP request on; the old one stops working.")
    rot.add_argument("--show", action="store_true",
                     help="print the new token on stdout (default: only where it is)")
    rot.set_defaults(func=cmd_token_rotate)

    v = sub.add_parser("version", help="show the client's and the daemon's versions",
                       description="The client's version and, if a daemon answers, its "
                       "version, API and accelerator. Does not start a daemon.")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=cmd_version)
