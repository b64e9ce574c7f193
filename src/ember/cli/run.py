"""``ember run``: a machine in the foreground (``ember.run``), or with ``-d`` under the daemon.

Both paths take the same machine options (``machine.add_create_options``) and
check them the same way, so a value means the same thing with or without -d.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ember.cli.common import command_args, parse_env, progress
from ember.cli.machine import add_create_options, check_shape, egress_policy
from ember.errors import EmberError


def cmd_run(args: argparse.Namespace) -> int:
    if args.rm and args.restart != "no":
        raise EmberError("--rm and --restart exclude each other")
    if args.detach:
        return run_detached(args)
    egress = egress_policy(args.egress)  # a bad rule: one line, before anything starts
    plan_key, speculative = _speculate(args)
    try:
        from ember.run import RunRequest, run
    except BaseException:
        if speculative is not None:
            speculative.discard()
        raise

    if args.restart != "no":
        raise EmberError("--restart is for machines under the daemon: add -d (a foreground "
                         "machine ends with its command)")
    if args.json:
        raise EmberError("--json prints the record of a machine started with -d")
    check_shape(args)
    env = parse_env(args.env)
    command = command_args(args)
    image = args.image
    if args.from_snapshot is not None:
        # no IMAGE with --from: what argparse took for one is the command's first word
        if image is not None and image != "--":
            command = [image, *command]
        image = ""
    elif image is None:
        raise EmberError("the following arguments are required: IMAGE (or --from SNAPSHOT) "
                         "(see `ember run --help`)")
    req = RunRequest(
        image=image, command=tuple(command) or None, entrypoint=args.entrypoint,
        env=tuple(f"{k}={v}" for k, v in env.items()), workdir=args.workdir, user=args.user,
        cpus=args.cpus, memory_mib=args.memory, accel=args.accel, interactive=args.interactive,
        tty=args.tty, hostname=args.hostname, boot_timeout=args.boot_timeout,
        network=args.network, ports=tuple(args.publish), name=args.name,
        verbose=args.verbose, cold=args.cold, from_snapshot=args.from_snapshot,
        pull=args.pull, egress=egress, volumes=tuple(args.volume),
        rootfs_size=args.rootfs_size)
    return run(req, progress(args), plan_key=plan_key, speculative=speculative)


def _speculate(args: argparse.Namespace) -> tuple[str | None, Any]:
    """A warm start's QEMU, spawned at once from this run's plan where there is one.

    Only for the plain case: an image reference (not a path), no name, no published
    ports, no egress policy, no volumes or host shares (``-v``), not cold. Whatever is
    spawned, ``ember.run.prepare`` checks it against the spec it builds, and kills it if
    they differ (``snapshots/plan.py``).
    """
    import os

    if (args.cold or args.from_snapshot is not None or args.name or args.publish
            or args.egress or args.volume or args.rootfs_size or args.image is None
            or os.path.exists(args.image)):
        return None, None
    from ember import paths
    from ember.snapshots import plan

    k = plan.key({"image": args.image, "cpus": args.cpus, "memory": args.memory,
                  "network": args.network, "hostname": args.hostname,
                  "accel": args.accel or os.environ.get("EMBER_ACCEL") or "auto",
                  "home": str(paths.data_dir()), "boot_cache": os.environ.get(
                      "EMBER_BOOT_CACHE", "")})
    return k, plan.spawn(paths.cache_dir(), paths.machines_dir(), k)


def run_detached(args: argparse.Namespace) -> int:
    """``ember run -d``: create and start a machine under the daemon, print its name."""
    from ember.cli.common import client
    from ember.cli.machine import create_machine

    if args.interactive or args.tty:
        raise EmberError("-d runs the machine in the background: drop -i/-t "
                         "(then `ember exec -it NAME sh`)")
    if args.accel:
        raise EmberError("with -d the daemon chooses the accelerator: use `ember serve --accel`")
    with client() as c:
        m = create_machine(c, args, start=True)
        if args.json:
            print(json.dumps(m.info.model_dump(mode="json"), indent=2))
            return 0
    print(m.name)
    return 0


def register(sub: Any) -> None:
    r = sub.add_parser("run", help="run a command in a new microVM from an image",
                       description="Boot IMAGE (a tag, an id, or a path to an OCI layout or "
                       "docker-save tarball) as a microVM and run the image's Entrypoint "
                       "followed by CMD (CMD replaces the image's Cmd; --entrypoint replaces "
                       "the Entrypoint, '' clears it); exit with its status. With -d the "
                       "machine runs under the daemon and its name is printed.")
    add_create_options(r)
    r.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None,
                   help="accelerator (default auto, or $EMBER_ACCEL)")
    r.add_argument("-i", "--interactive", action="store_true",
                   help="pass stdin through even when it is a terminal")
    r.add_argument("-t", "--tty", action="store_true", help="run on a guest pseudo-terminal")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    r.add_argument("-d", "--detach", action="store_true",
                   help="run as a background service under the daemon; print its name")
    r.add_argument("--json", action="store_true",
                   help="with -d: print the machine's record as JSON")
    r.add_argument("--from", dest="from_snapshot", metavar="SNAPSHOT",
                   help="start as a clone of this snapshot (id, prefix or tag) instead of IMAGE")
    r.add_argument("--boot-timeout", type=float, default=60.0, metavar="SECONDS",
                   help=argparse.SUPPRESS)
    r.add_argument("image", metavar="IMAGE", nargs="?")
    r.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    r.set_defaults(func=cmd_run)
