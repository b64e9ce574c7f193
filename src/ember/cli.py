"""The ``ember`` command line: arguments in, library calls, output formatting out.

Kept thin and quick to start: heavy modules are imported inside the command
that needs them, so ``ember run`` pays only for what it uses.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ember import __version__
from ember.errors import EmberError, MachineCrashed

if TYPE_CHECKING:
    from ember.util import Progress

#: Exit statuses of Ember itself, as Docker uses them: 125 when Ember fails,
#: 126 when the command cannot be run, 127 when it is not found.
EXIT_EMBER_FAILED = 125


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="ember: %(levelname)s: %(message)s",
    )
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except MachineCrashed as exc:
        _error(str(exc))
        if exc.console_tail:
            print("--- last lines of the guest console ---", file=sys.stderr)
            print(exc.console_tail, file=sys.stderr)
        return EXIT_EMBER_FAILED
    except EmberError as exc:
        code = getattr(exc, "code", None)
        _error(str(exc))
        return code if isinstance(code, int) and code in (126, 127) else EXIT_EMBER_FAILED
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:  # a bug: still one line, the traceback only with -v
        logging.getLogger("ember").debug("internal error", exc_info=True)
        _error(f"internal error: {type(exc).__name__}: {exc} (run with -v for details)")
        return EXIT_EMBER_FAILED


def _error(msg: str) -> None:
    print(f"ember: error: {msg}", file=sys.stderr)


def _progress(args: argparse.Namespace) -> Progress:
    from ember.util import no_progress, stderr_progress

    return no_progress if getattr(args, "quiet", False) else stderr_progress


# ---------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from ember.run import RunRequest, run

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    req = RunRequest(
        image=args.image, command=tuple(command) or None, entrypoint=args.entrypoint,
        env=tuple(_host_env(args.env)), workdir=args.workdir, user=args.user, cpus=args.cpus,
        memory_mib=args.memory, accel=args.accel, interactive=args.interactive,
        tty=args.tty, hostname=args.hostname, boot_timeout=args.boot_timeout,
        network=args.network, ports=tuple(args.publish),
    )
    if args.detach:
        from ember import cli_api

        return cli_api.run_detached(args)
    return run(req, _progress(args))


def _host_env(entries: list[str]) -> list[str]:
    """``-e K=V`` as given; ``-e K`` takes K's value from this environment (skipped if unset)."""
    out = []
    for entry in entries:
        if "=" in entry:
            out.append(entry)
        elif entry in os.environ:
            out.append(f"{entry}={os.environ[entry]}")
    return out


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

    setup(install_packages=not args.no_packages, progress=_progress(args))
    return 0


def cmd_image_import(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ember import paths
    from ember.images import ImageStore

    image = ImageStore(paths.images_dir()).import_path(
        Path(args.path), tag=args.tag, progress=_progress(args))
    print(image.id)
    return 0


def cmd_image_ls(args: argparse.Namespace) -> int:
    from ember import paths
    from ember.images import ImageStore, human_size

    images = ImageStore(paths.images_dir()).list()
    if args.json:
        print(json.dumps([
            {"id": i.id, "tags": list(i.tags), "size": i.size, "created": i.created}
            for i in images
        ], indent=2))
        return 0
    rows = [("ID", "TAGS", "SIZE", "CREATED")]
    for i in images:
        tags = ", ".join(i.tags) or "<none>"
        rows.append((i.short_id, tags, human_size(i.size), i.created or ""))
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_image_inspect(args: argparse.Namespace) -> int:
    from ember import paths
    from ember.images import ImageStore

    store = ImageStore(paths.images_dir())
    image = store.resolve(args.ref)
    c = image.config
    print(json.dumps({
        "id": image.id, "tags": list(image.tags), "manifest_digest": image.manifest_digest,
        "created": image.created, "size": image.size,
        "layers": [{"digest": x.digest, "media_type": x.media_type, "size": x.size,
                    "diff_id": x.diff_id} for x in image.layers],
        "config": {"Entrypoint": c.entrypoint, "Cmd": c.cmd, "Env": list(c.env),
                   "WorkingDir": c.working_dir, "User": c.user, "Labels": c.labels_dict,
                   "ExposedPorts": list(c.exposed_ports), "StopSignal": c.stop_signal},
        "rootfs": str(store.rootfs_path(image)),
    }, indent=2))
    return 0


def cmd_image_rm(args: argparse.Namespace) -> int:
    from ember import paths
    from ember.images import ImageStore

    store = ImageStore(paths.images_dir())
    status = 0
    for ref in args.refs:
        try:
            image = store.remove(ref)
            print(f"removed {image.id}")
        except EmberError as exc:
            _error(str(exc))
            status = 1
    return status


def cmd_serve(args: argparse.Namespace) -> int:
    from ember.daemon.server import serve

    return serve(tcp=args.tcp, token=args.token, accel=args.accel, verbose=args.verbose)


# ---------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ember", description="Run OCI images as micro virtual machines.")
    p.add_argument("--version", action="version", version=f"ember {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = p.add_subparsers(metavar="COMMAND")

    r = sub.add_parser("run", help="run a command in a new microVM from an image",
                       description="Boot IMAGE (a tag, an id, or a path to an OCI layout or "
                       "docker-save tarball) as a microVM, run CMD (default: the image's "
                       "Entrypoint + Cmd) and exit with its status.")
    r.add_argument("--cpus", type=_int_range(1, 64), default=1, help="vCPUs (default 1)")
    r.add_argument("-m", "--memory", type=_int_range(64, 262144), default=256,
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

    img = sub.add_parser("image", help="manage images").add_subparsers(metavar="ACTION")
    i = img.add_parser("import", help="import an OCI layout or a docker-save tarball")
    i.add_argument("path")
    i.add_argument("--tag", "-t", help="name:tag to give the image")
    i.add_argument("-q", "--quiet", action="store_true")
    i.set_defaults(func=cmd_image_import)
    ls = img.add_parser("ls", help="list images")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_image_ls)
    ins = img.add_parser("inspect", help="show an image's record and config as JSON")
    ins.add_argument("ref", metavar="IMAGE")
    ins.set_defaults(func=cmd_image_inspect)
    rm = img.add_parser("rm", help="remove images")
    rm.add_argument("refs", nargs="+", metavar="IMAGE")
    rm.set_defaults(func=cmd_image_rm)

    from ember import cli_api  # the daemon's commands (light: no httpx until used)

    cli_api.register(sub)
    return p


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if not lo <= n <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}")
        return n
    return parse


if __name__ == "__main__":
    sys.exit(main())
    os._exit(0)
