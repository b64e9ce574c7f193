"""Machines under the daemon: create, start, stop, kill, pause, resume, rm, ps, inspect, port, logs.

Each command is one or a few SDK calls (``ember.sdk``); errors raise (the
SDK's are :class:`EmberError` s) and ``ember.cli.main`` prints them as one
line with exit status 125. The daemon is started on demand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from ember.cli.common import (
    client,
    command_args,
    console,
    count,
    each,
    entrypoint_arg,
    parse_env,
    parse_memory,
    pipe_safe,
    port_number,
    write_all,
)
from ember.errors import EmberError

if TYPE_CHECKING:
    from datetime import datetime

    from ember.api.models import Machine
    from ember.sdk import Client, MachineHandle


def _machine_json(info: Machine) -> str:
    return json.dumps(info.model_dump(mode="json"), indent=2)


# ---------------------------------------------------------------- create


def create_machine(c: Client, args: argparse.Namespace, *, start: bool) -> MachineHandle:
    from ember.sdk import parse_port

    image = args.image
    if ("/" in image or image.endswith(".tar")) and os.path.exists(image):
        # a path, as `ember run` takes it: imported into the daemon's store first
        from ember.cli.common import progress
        from ember.cli.image import import_image

        imported = import_image(c, image, None, progress(args))
        image = imported.tags[0] if imported.tags else imported.id
    command = command_args(args)
    m = c.machines.create(
        image, name=args.name, cpus=args.cpus, memory_mib=args.memory,
        env=parse_env(args.env), cmd=command or None, entrypoint=entrypoint_arg(args.entrypoint),
        workdir=args.workdir, user=args.user, hostname=args.hostname,
        ports=[parse_port(p) for p in args.publish],
        network=args.network, restart=args.restart, start=False)
    if start:
        try:
            m.start()
        except EmberError as exc:
            raise EmberError(f"{exc} (machine {m.name} was created but did not start; see "
                             f"`ember logs --console {m.name}`)") from None
    return m


def cmd_create(args: argparse.Namespace) -> int:
    with client() as c:
        m = create_machine(c, args, start=False)
    print(_machine_json(m.info) if args.json else m.name)
    return 0



# ---------------------------------------------------------------- lifecycle


def cmd_start(args: argparse.Namespace) -> int:
    return each(args.names, lambda c, n: (c.machines.get(n).start(), print(n)))


def cmd_stop(args: argparse.Namespace) -> int:
    return each(args.names, lambda c, n: (c.machines.get(n).stop(args.time), print(n)))


def cmd_kill(args: argparse.Namespace) -> int:
    return each(args.names, lambda c, n: (c.machines.get(n).kill(), print(n)))


def cmd_pause(args: argparse.Namespace) -> int:
    return each(args.names, lambda c, n: (c.machines.get(n).pause(), print(n)))


def cmd_resume(args: argparse.Namespace) -> int:
    return each(args.names, lambda c, n: (c.machines.get(n).resume(), print(n)))


def cmd_rm(args: argparse.Namespace) -> int:
    return each(args.names, lambda c, n: (c.machines.get(n).remove(args.force), print(n)))



# ---------------------------------------------------------------- ps / inspect / port


def _ago(stamp: str | None, now: datetime | None = None) -> str:
    from datetime import UTC, datetime

    if not stamp:
        return ""
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    secs = int(((now or datetime.now(UTC)) - then).total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if secs >= size:
            n = secs // size
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "just now" if secs < 5 else f"{secs} seconds ago"


def format_ports(info: Machine) -> str:
    return ", ".join(f"{p.host_ip}:{p.host_port}->{p.guest_port}/{p.protocol}"
                     for p in info.ports)


def _state(info: Machine) -> str:
    state = info.state.value
    if info.exit_code is not None and state in ("stopped", "crashed"):
        return f"{state} ({info.exit_code})"
    return state


def _command_text(info: Machine) -> str:
    argv = [*(info.entrypoint or []), *(info.cmd or [])]
    text = " ".join(argv) if argv else "(image default)"
    return text if len(text) <= 40 else text[:39] + "…"


def cmd_ps(args: argparse.Namespace) -> int:
    with client() as c:
        machines = [m.info for m in c.machines.list(all=args.all)]
    if args.json:
        print(json.dumps([m.model_dump(mode="json") for m in machines], indent=2))
        return 0
    if args.quiet:
        for m in machines:
            print(m.name)
        return 0
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "ID", "IMAGE", "STATE", "CREATED", "PORTS", "COMMAND"):
        table.add_column(col, no_wrap=True, overflow="fold")
    for m in machines:
        table.add_row(m.name, m.id[:12], m.image, _state(m), _ago(m.created_at),
                      format_ports(m), _command_text(m))
    out = console()
    with out.capture() as captured:
        out.print(table)
    for line in captured.get().splitlines():
        print(line.rstrip())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    found: list[dict[str, Any]] = []

    def get(c: Client, name: str) -> None:
        found.append(c.machines.get(name).info.model_dump(mode="json"))

    status = each(args.names, get)
    doc: Any = found[0] if len(args.names) == 1 and found else found
    if found or len(args.names) > 1:
        if args.json or not sys.stdout.isatty():
            print(json.dumps(doc, indent=2))
        else:
            console().print_json(data=doc)
    return status


def cmd_port(args: argparse.Namespace) -> int:
    with client() as c:
        info = c.machines.get(args.name).info
    ports = [p for p in info.ports if args.port is None or p.guest_port == args.port]
    if args.port is not None and not ports:
        raise EmberError(f"machine {info.name} does not publish guest port {args.port}")
    if args.json:
        print(json.dumps([p.model_dump(mode="json") for p in ports], indent=2))
    else:
        for p in ports:
            print(f"{p.guest_port}/{p.protocol} -> {p.host_ip}:{p.host_port}")
    return 0



# ---------------------------------------------------------------- logs


def cmd_logs(args: argparse.Namespace) -> int:
    source = "console" if args.console else "output"
    with client() as c:
        m = c.machines.get(args.name)
        for chunk in m.logs(source=source, follow=args.follow, tail=args.tail):
            write_all(1, chunk)
    return 0


def register(sub: Any) -> None:
    c = sub.add_parser("create", help="create a machine under the daemon (not started)",
                       description="Create a machine from IMAGE under the daemon and print its "
                       "name; `ember start NAME` boots it.")
    add_create_options(c)
    c.add_argument("--json", action="store_true", help="print the machine's record as JSON")
    c.add_argument("image", metavar="IMAGE")
    c.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    c.set_defaults(func=pipe_safe(cmd_create))

    for name, func, text in (("start", cmd_start, "boot machines"),
                             ("kill", cmd_kill, "power machines off at once"),
                             ("pause", cmd_pause, "freeze machines' vCPUs"),
                             ("resume", cmd_resume, "unfreeze paused machines")):
        p = sub.add_parser(name, help=text)
        p.add_argument("names", nargs="+", metavar="NAME")
        p.set_defaults(func=pipe_safe(func))
    p = sub.add_parser("stop", help="stop machines: SIGTERM, then power off after a timeout")
    p.add_argument("-t", "--time", type=float, default=10.0, metavar="SECONDS",
                   help="seconds to wait after SIGTERM before powering off (default 10)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=pipe_safe(cmd_stop))
    p = sub.add_parser("rm", help="remove machines")
    p.add_argument("-f", "--force", action="store_true", help="remove running machines too")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=pipe_safe(cmd_rm))

    p = sub.add_parser("ps", help="list machines")
    p.add_argument("-a", "--all", action="store_true", help="also stopped and created ones")
    p.add_argument("-q", "--quiet", action="store_true", help="names only")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=pipe_safe(cmd_ps))

    p = sub.add_parser("inspect", help="show machines' records as JSON")
    p.add_argument("--json", action="store_true", help="plain JSON (the default when piped)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=pipe_safe(cmd_inspect))

    p = sub.add_parser("port", help="list a machine's published ports")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("name", metavar="NAME")
    p.add_argument("port", nargs="?", type=port_number, metavar="GUEST_PORT")
    p.set_defaults(func=pipe_safe(cmd_port))

    p = sub.add_parser("logs", help="print a machine's output (or its console)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until it stops")
    p.add_argument("--console", action="store_true", help="the serial console instead")
    p.add_argument("--tail", type=count, default=0, metavar="N",
                   help="only the last N lines (default: all)")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=pipe_safe(cmd_logs))


def add_create_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="machine name (default: generated)")
    p.add_argument("--cpus", type=count, default=1, help="vCPUs (default 1)")
    p.add_argument("-m", "--memory", type=parse_memory, default=256, metavar="MIB",
                   help="guest memory in MiB, or 512m / 2g (default 256)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K[=V]",
                   help="set an environment variable; K alone passes this shell's value")
    p.add_argument("-w", "--workdir", metavar="DIR", help="working directory in the guest")
    p.add_argument("-u", "--user", metavar="USER[:GROUP]", help="user to run as")
    p.add_argument("--entrypoint", help="override the image's entrypoint ('' clears it)")
    p.add_argument("--hostname", help="guest hostname")
    p.add_argument("-p", "--publish", action="append", default=[],
                   metavar="[IP:]HOST:GUEST",
                   help="publish a guest TCP port on the host (GUEST alone: any free port)")
    p.add_argument("--network", choices=("user", "none"), default="user",
                   help="user: NAT with outbound access (default); none: no network")
    p.add_argument("--restart", choices=("no", "on-failure", "always"), default="no",
                   help="restart policy (default no)")
