"""``ember run``: a machine in the foreground (``ember.run``), or with ``-d`` under the daemon."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ember.cli.common import command_args, int_range, progress
from ember.errors import EmberError


def cmd_run(args: argparse.Namespace) -> int:
    from ember.run import RunRequest, run

    command = command_args(args)
    req = RunRequest(
        image=args.image, command=tuple(command) or None, entrypoint=args.entrypoint,
        env=tuple(_host_env(args.env)), workdir=args.workdir, user=args.user, cpus=args.cpus,
        memory_mib=args.memory, accel=args.accel, interactive=args.interactive,
        tty=args.tty, hostname=args.hostname, boot_timeout=args.boot_timeout,
        network=args.network, ports=tuple(args.publish),
    )
    if args.detach:
        return run_detached(args)
    return run(req, progress(args))


def _host_env(entries: list[str]) -> list[str]:
    """``-e K=V`` as given; ``-e K`` takes K's value from this environment (skipped if unset)."""
    out = []
    for entry in entries:
        if "=" in entry:
            out.append(entry)
        elif entry in os.environ:
            out.append(f"{entry}={os.environ[entry]}")
    return out


def run_detached(args: argparse.Namespace) -> int:
    """``ember run -d``: create and start a machine under the daemon, print its name."""
    from ember.cli.common import client
    from ember.cli.machine import create_machine

    if args.interactive or args.tty:
        raise EmberError("-d runs the machine in the background: drop -i/-t "
                         "(then `ember exec -it NAME sh`)")
    if getattr(args, "accel", None):
        raise EmberError("with -d the daemon chooses the accelerator: use `ember serve --accel`")
    with client() as c:
        m = create_machine(c, args, start=True)
    print(m.name)
    return 0


def register(sub: Any) -> None:
    r = sub.add_parser("run", help="run a command in a new microVM from an image",
                       description="Boot IMAGE (a tag, an id, or a path to an OCI layout or "
                       "docker-save tarball) as a microVM, run CMD (default: the image's "
                       "Entrypoint + Cmd) and exit with its status.")
    r.add_argument("--cpus", type=int_range(1, 64), default=1, help="vCPUs (default 1)")
    r.add_argument("-m", "--memory", type=int_range(64, 262144), default=256,
                   metavar="MIB", help="guest memory in MiB (default 256)")
    r.add_argument("-e", "--env", action="append", default=[], metavar="K[=V]",
                   help="set an environment variable; K alone passes this shell's value "
                   "(repeatable)")
    r.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the guest")
    r.add_argument("-u", "--user", metavar="USER[:GROUP]", help="user to run as")
    r.add_argument("--entrypoint", help="override the image's entrypoint")
    r.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None,
                   help="accelerator (default auto, or $EMBER_ACCEL)")
    r.add_argument("--hostname", help="guest hostname")
    r.add_argument("-i", "--interactive", action="store_true",
                   help="pass stdin through even when it is a terminal")
    r.add_argument("-t", "--tty", action="store_true", help="run on a guest pseudo-terminal")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    r.add_argument("-p", "--publish", action="append", default=[], metavar="[IP:]HOST:GUEST",
                   help="publish a guest TCP port on the host (127.0.0.1 unless IP is given; "
                   "GUEST alone picks a free host port); repeatable")
    r.add_argument("--network", choices=("user", "none"), default="user",
                   help="user: NAT with outbound access (default); none: no network at all")
    r.add_argument("-d", "--detach", action="store_true",
                   help="run as a background service under the daemon; print its name")
    r.add_argument("--name", help="name of the machine (with -d)")
    r.add_argument("--restart", choices=("no", "on-failure", "always"), default="no",
                   help="restart policy (with -d)")
    r.add_argument("--boot-timeout", type=float, default=60.0, metavar="SECONDS",
                   help=argparse.SUPPRESS)
    r.add_argument("image", metavar="IMAGE")
    r.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    r.set_defaults(func=cmd_run)
