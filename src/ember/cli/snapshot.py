"""``ember snapshot create|ls|inspect|rm`` and ``ember clone``: snapshots under the daemon.

``ember run --from SNAP`` (foreground) is in ``cli/run.py``; ``ember create --from
SNAP`` in ``cli/machine.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from ember.cli.common import client, console, count, each, pipe_safe

if TYPE_CHECKING:
    from ember.api.models import Snapshot


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n < 1 << 30 else f"{n / (1 << 30):.2f} GiB"


def _describe(s: Snapshot) -> str:
    return (f"snapshot {s.tag or s.id[:12]} of {s.parent or '?'}: paused {s.pause_ms:g} ms, "
            f"{_size(s.memory_allocated)} of memory, {_size(s.size_on_disk)} on disk")


def cmd_create(args: argparse.Namespace) -> int:
    with client() as c:
        snap = c.machines.get(args.machine).snapshot(args.tag)
    if args.json:
        print(json.dumps(snap.model_dump(mode="json"), indent=2))
    else:
        print(_describe(snap), file=sys.stderr)
        print(snap.id)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with client() as c:
        snaps = c.snapshots.list(all=args.all)
    if args.quiet:
        for s in snaps:
            print(s.id)
        return 0
    if args.format == "json":
        print(json.dumps([s.model_dump(mode="json") for s in snaps], indent=2))
        return 0
    from rich.table import Table

    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("SNAPSHOT ID", "TAG", "KIND", "MACHINE", "IMAGE", "SHAPE", "CREATED",
                "SIZE", "CLONES"):
        t.add_column(col)
    for s in snaps:
        t.add_row(s.id[:12], s.tag or "", s.kind, s.parent or "", s.image,
                  f"{s.cpus} vCPU, {s.memory_mib} MiB", s.created, _size(s.size_on_disk),
                  str(len(s.clones)) + (" (in use)" if s.in_use and not s.clones else ""))
    console().print(t)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    found: list[dict[str, Any]] = []

    def one(c: Any, ref: str) -> None:
        found.append(c.snapshots.get(ref).model_dump(mode="json"))

    status = each(args.refs, one)
    print(json.dumps(found, indent=2))
    return status


def cmd_rm(args: argparse.Namespace) -> int:
    return each(args.refs, lambda c, r: (c.snapshots.remove(r, force=args.force), print(r)))


def cmd_clone(args: argparse.Namespace) -> int:
    with client() as c:
        snap, clones = c.machines.get(args.machine).clone(args.count, args.tag)
    print(_describe(snap), file=sys.stderr)
    for m in clones:
        print(m.name)
    return 0


def register(sub: Any) -> None:
    from ember.cli.common import help_command

    s = sub.add_parser("snapshot", help="snapshots of machines: create, ls, inspect, rm",
                       description="Snapshots capture a running machine whole (memory, "
                       "devices, files); clones start from them in milliseconds.")
    s.set_defaults(func=help_command(s))
    ss = s.add_subparsers(metavar="ACTION")
    c = ss.add_parser("create", help="snapshot a running or paused machine",
                      description="Snapshot MACHINE; it is stopped only for the capture and "
                      "goes on running. Prints the snapshot's id.")
    c.add_argument("machine", metavar="MACHINE")
    c.add_argument("--tag", help="a unique name for the snapshot")
    c.add_argument("--json", action="store_true", help="print the snapshot's record as JSON")
    c.set_defaults(func=pipe_safe(cmd_create))
    ls = ss.add_parser("ls", aliases=["list"], help="list snapshots")
    ls.add_argument("-a", "--all", action="store_true",
                    help="also the boot snapshots of `ember run`'s warm starts")
    ls.add_argument("-q", "--quiet", action="store_true", help="only ids")
    ls.add_argument("--format", choices=("table", "json"), default="table")
    ls.set_defaults(func=pipe_safe(cmd_ls))
    i = ss.add_parser("inspect", help="a snapshot's record as JSON")
    i.add_argument("refs", nargs="+", metavar="SNAPSHOT")
    i.set_defaults(func=pipe_safe(cmd_inspect))
    rm = ss.add_parser("rm", aliases=["remove"], help="remove snapshots",
                       description="Remove snapshots; refused while clones of one exist "
                       "(-f removes the daemon's clones first) or a running clone maps it.")
    rm.add_argument("-f", "--force", action="store_true", help="remove its clones first")
    rm.add_argument("refs", nargs="+", metavar="SNAPSHOT")
    rm.set_defaults(func=pipe_safe(cmd_rm))

    cl = sub.add_parser("clone", help="snapshot a machine and start clones of it",
                        description="Snapshot MACHINE and start N clones of it (named "
                        "MACHINE-1, MACHINE-2, ...); prints their names, one per line.")
    cl.add_argument("machine", metavar="MACHINE")
    cl.add_argument("-n", "--count", type=count, default=1, help="how many clones (default 1)")
    cl.add_argument("--tag", help="a tag for the snapshot")
    cl.set_defaults(func=pipe_safe(cmd_clone))
