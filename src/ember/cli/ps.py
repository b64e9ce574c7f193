"""Looking at machines: ``ember ps`` (filters, formats), ``ember inspect``, ``ember port``.

On the CLI's lean path (``cli/wire.py``): the daemon's JSON records, read through
:class:`MachineView`, with no SDK and no rich table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ember.cli.common import console, pipe_safe, port_number
from ember.errors import EmberError

if TYPE_CHECKING:
    from datetime import datetime


class Port:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.guest_port = int(doc["guest_port"])
        self.host_port = int(doc["host_port"])
        self.host_ip = str(doc.get("host_ip", ""))
        self.protocol = str(doc.get("protocol", "tcp"))


class MachineView:
    """A machine record as the API sends it (``Machine`` in docs/openapi.json)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.id = str(doc["id"])
        self.name = str(doc["name"])
        self.state = str(doc["state"])
        self.image = str(doc.get("image", ""))
        self.image_id = str(doc.get("image_id") or "")
        self.restart = str(doc.get("restart", "no"))
        self.restart_count = int(doc.get("restart_count") or 0)
        self.exit_code: int | None = doc.get("exit_code")
        self.created_at: str | None = doc.get("created_at")
        self.entrypoint: list[str] | None = doc.get("entrypoint")
        self.cmd: list[str] | None = doc.get("cmd")
        self.ports = [Port(x) for x in doc.get("ports") or []]



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


def format_ports(info: MachineView) -> str:
    return ", ".join(f"{p.host_ip}:{p.host_port}->{p.guest_port}/{p.protocol}"
                     for p in info.ports)


def _state(info: MachineView) -> str:
    state = info.state
    if info.exit_code is not None and state in ("stopped", "crashed"):
        return f"{state} ({info.exit_code})"
    return state


def _command_text(info: MachineView, width: int = 40) -> str:
    argv = [*(info.entrypoint or []), *(info.cmd or [])]
    text = " ".join(argv) if argv else "(image default)"
    return text if len(text) <= width else text[:width - 1] + "…"


# ---------------------------------------------------------------- --filter


#: Docker's container states, as Ember names them (``exited`` is ``stopped``).
_STATUS_ALIASES = {"exited": "stopped", "dead": "crashed", "up": "running"}
_FILTER_KEYS = ("name", "id", "status", "ancestor", "restart")


def parse_filters(values: Sequence[str]) -> dict[str, list[str]]:
    """``--filter KEY=VALUE`` (repeatable): the same key twice is OR, different keys AND."""
    out: dict[str, list[str]] = {}
    for v in values:
        key, sep, value = v.partition("=")
        key = key.strip().lower()
        if not sep or key not in _FILTER_KEYS:
            raise EmberError(f"--filter {v!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(_FILTER_KEYS)}")
        out.setdefault(key, []).append(value.strip())
    return out


def matches(m: MachineView, filters: dict[str, list[str]]) -> bool:
    tests: dict[str, Callable[[str], bool]] = {
        "name": lambda v: v in m.name,
        "id": lambda v: m.id.startswith(v),
        "status": lambda v: m.state == _STATUS_ALIASES.get(v, v),
        "ancestor": lambda v: v in (m.image, m.image_id) or m.image_id.removeprefix(
            "sha256:").startswith(v.removeprefix("sha256:")),
        "restart": lambda v: m.restart == v,
    }
    return all(any(tests[k](v) for v in vs) for k, vs in filters.items())


# ---------------------------------------------------------------- --format

_PLACEHOLDER = re.compile(r"\{\{\s*\.(\w+)\s*\}\}")


def _fields(m: MachineView) -> dict[str, str]:
    return {"ID": m.id[:12], "FullID": m.id, "Names": m.name, "Name": m.name,
            "Image": m.image, "Command": _command_text(m, 80), "CreatedAt": m.created_at or "",
            "RunningFor": _ago(m.created_at), "Ports": format_ports(m), "Status": _state(m),
            "State": m.state, "ExitCode": "" if m.exit_code is None else str(m.exit_code),
            "Restarts": str(m.restart_count)}


def render(template: str, m: MachineView) -> str:
    """A Go-template-like ``--format``: ``{{.Names}}\\t{{.Status}}`` (Docker's field names)."""
    fields = _fields(m)

    def field(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in fields:
            raise EmberError(f"--format: unknown field .{name} (fields: "
                             f"{', '.join(sorted(fields))})")
        return fields[name]

    return _PLACEHOLDER.sub(field, template.replace("\\t", "\t").replace("\\n", "\n"))


def _machines(all: bool) -> list[MachineView]:
    from ember.cli.wire import Wire

    with Wire() as w:
        return [MachineView(d) for d in w.call("GET", "/v1/machines", params={"all": all})]


def cmd_ps(args: argparse.Namespace) -> int:
    filters = parse_filters(args.filter)
    machines = [m for m in _machines(args.all or bool(filters.get("status")))
                if matches(m, filters)]
    fmt = args.format
    if args.json or fmt == "json":
        if fmt == "json":  # Docker: one object per line
            for m in machines:
                print(json.dumps(m.doc))
        else:
            print(json.dumps([m.doc for m in machines], indent=2))
        return 0
    if args.quiet:
        for m in machines:
            print(m.id[:12])
        return 0
    if fmt:
        header = fmt.startswith("table")
        template = fmt.removeprefix("table").strip() if header else fmt
        if header:
            print(_PLACEHOLDER.sub(lambda x: x.group(1).upper(),
                                   template.replace("\\t", "\t")))
        for m in machines:
            print(render(template, m))
        return 0
    rows = [("NAME", "ID", "IMAGE", "STATE", "CREATED", "PORTS", "COMMAND")]
    rows += [(m.name, m.id[:12], m.image, _state(m), _ago(m.created_at), format_ports(m),
              _command_text(m)) for m in machines]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    bold = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    for n, r in enumerate(rows):
        line = "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
        print(f"\033[1m{line}\033[0m" if bold and n == 0 else line)
    return 0


def _records(names: Sequence[str]) -> tuple[list[dict[str, Any]], int]:
    """The records of ``names`` (those found) and the exit status (125 if any was not)."""
    from ember.cli.common import EXIT_EMBER_FAILED, error
    from ember.cli.wire import Wire, quote_name
    from ember.sdk.errors import DaemonUnavailable

    found: list[dict[str, Any]] = []
    status = 0
    with Wire() as w:
        for name in names:
            try:
                found.append(w.call("GET", f"/v1/machines/{quote_name(name)}"))
            except DaemonUnavailable:
                raise
            except EmberError as exc:
                error(str(exc))
                status = EXIT_EMBER_FAILED
    return found, status


def cmd_inspect(args: argparse.Namespace) -> int:
    """The records as a JSON array, always (as ``docker inspect``), even for one name."""
    found, status = _records(args.names)
    if args.json or not sys.stdout.isatty():
        print(json.dumps(found, indent=2))
    else:
        console().print_json(data=found)
    return status


def cmd_port(args: argparse.Namespace) -> int:
    from ember.cli.wire import Wire, quote_name

    with Wire() as w:
        info = MachineView(w.call("GET", f"/v1/machines/{quote_name(args.name)}"))
    ports = [p for p in info.ports if args.port is None or p.guest_port == args.port]
    if args.port is not None and not ports:
        state = info.state
        raise EmberError(f"machine {info.name} does not publish guest port {args.port}"
                         + ("" if state == "running" else f" (it is {state})"))
    if args.json:
        print(json.dumps([p.__dict__ for p in ports], indent=2))
    else:
        for p in ports:
            print(f"{p.guest_port}/{p.protocol} -> {p.host_ip}:{p.host_port}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("ps", help="list machines")
    p.add_argument("-a", "--all", action="store_true", help="also stopped and created ones")
    p.add_argument("-q", "--quiet", action="store_true", help="ids only (12 characters)")
    p.add_argument("-f", "--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="name=, id=, status=, ancestor= (image), restart=; repeatable: the "
                   "same key twice is OR, different keys AND")
    p.add_argument("--format", metavar="TEMPLATE",
                   help="json (one object per line), or a template of Docker's fields: "
                   "'{{.Names}}\\t{{.Status}}' ('table ...' adds a header)")
    p.add_argument("--json", action="store_true", help="a JSON array")
    p.set_defaults(func=pipe_safe(cmd_ps))

    p = sub.add_parser("inspect", help="show machines' records (a JSON array)")
    p.add_argument("--json", action="store_true", help="plain JSON (the default when piped)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=pipe_safe(cmd_inspect))

    p = sub.add_parser("port", help="list a machine's published ports")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("name", metavar="NAME")
    p.add_argument("port", nargs="?", type=port_number, metavar="GUEST_PORT")
    p.set_defaults(func=pipe_safe(cmd_port))
