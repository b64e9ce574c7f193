"""``ember volume``: create, ls, inspect and rm named volumes, through the daemon.

A volume is a persistent disk (an ext4 of its own, ``volumes/store.py``) that
machines mount by name: ``ember run -v NAME:/PATH[:ro]``. It outlives them, and
can be removed while no running machine has it (as ``docker volume rm``).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from ember.cli.common import (
    client,
    each,
    help_command,
    inspect_each,
    size_between,
)

if TYPE_CHECKING:
    from ember.api.models import Volume


def cmd_volume_create(args: argparse.Namespace) -> int:
    with client() as c:
        vol = c.volumes.create(args.name, args.size)
    print(vol.name)
    return 0


def human_size(n: int) -> str:
    """Binary units, as sizes are given (``--size 10G``): ``10737418240`` -> ``"10G"``."""
    size = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if size < 1024 or unit == "T":
            return f"{size:.0f}{unit}" if unit == "B" or size == int(size) \
                else f"{size:.1f}{unit}"
        size /= 1024
    raise AssertionError("unreachable")


def cmd_volume_ls(args: argparse.Namespace) -> int:
    with client() as c:
        vols = c.volumes.list()
    if args.json:
        print(json.dumps([v.model_dump(mode="json") for v in vols], indent=2))
        return 0
    if args.quiet:
        for v in vols:
            print(v.name)
        return 0
    rows = [("NAME", "SIZE", "DISK", "IN-USE", "CREATED")]
    for v in vols:
        rows.append((v.name, human_size(v.size_bytes), human_size(v.disk_bytes),
                     "yes" if v.in_use else "no", v.created_at))
    widths = [max(len(r[col]) for r in rows) for col in range(5)]
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip())
    return 0


def inspect_doc(vol: Volume) -> dict[str, Any]:
    return vol.model_dump(mode="json")


def cmd_volume_inspect(args: argparse.Namespace) -> int:
    """A JSON array of the volumes found; an error line for each of the others."""
    return inspect_each(args.names, lambda c, name: c.volumes.get(name), inspect_doc)


def cmd_volume_rm(args: argparse.Namespace) -> int:
    """Each volume removed is printed; one in use or missing is an error line (and exit
    125), and the others are still removed."""
    def remove(c: Any, name: str) -> None:
        c.volumes.remove(name)
        print(name)

    return each(args.names, remove)


def size_arg(value: str) -> int:
    from ember.volumes.store import MAX_SIZE, MIN_SIZE

    return size_between(value, MIN_SIZE, MAX_SIZE, "a volume's size")


def register(sub: Any) -> None:
    group = sub.add_parser(
        "volume", help="manage named volumes (through the daemon)",
        description="Named volumes: persistent disks that machines mount by name "
                    "(ember run -v NAME:/PATH[:ro]). A volume outlives its machines; rm "
                    "refuses one a running machine has.")
    group.set_defaults(func=help_command(group))
    vol = group.add_subparsers(metavar="ACTION")
    cr = vol.add_parser("create", help="make a volume (an empty ext4, stored sparse)")
    cr.add_argument("name", metavar="NAME")
    cr.add_argument("--size", type=size_arg, default=None, metavar="SIZE",
                    help="its size: bytes, or with K, M, G, T (powers of 1024; default 10G)")
    cr.set_defaults(func=cmd_volume_create)
    ls = vol.add_parser("ls", help="list volumes")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("-q", "--quiet", action="store_true", help="only the names")
    ls.set_defaults(func=cmd_volume_ls)
    ins = vol.add_parser("inspect", help="show volumes' records as a JSON array")
    ins.add_argument("names", nargs="+", metavar="NAME")
    ins.set_defaults(func=cmd_volume_inspect)
    rm = vol.add_parser("rm", help="delete volumes and their data (not one a running "
                        "machine has)")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(func=cmd_volume_rm)
