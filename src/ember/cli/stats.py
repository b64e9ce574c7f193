"""Watching: ``ember stats`` (live host usage per machine), ``ember top`` (the guest's
processes) and ``ember events`` (the daemon's event log, streamed).

All three are on the CLI's lean path (``cli/wire.py``). ``stats`` takes two
readings a second apart (``--no-stream``: one pair) and shows the CPU share
between them, as ``docker stats`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from ember.cli.common import pipe_safe
from ember.errors import EmberError

#: Seconds between two readings of ``stats``.
INTERVAL = 1.0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}MiB"


def _human(n: int) -> str:
    from ember.images.rootfs import human_size

    return human_size(n)


def _readings(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    from ember.cli.wire import Wire, quote_name

    with Wire() as w:
        if names:
            docs = [w.call("GET", f"/v1/machines/{quote_name(n)}/stats") for n in names]
        else:
            docs = w.call("GET", "/v1/stats")
    return {d["id"]: d for d in docs}


def _rows(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
          ) -> list[dict[str, Any]]:
    rows = []
    for key, now in after.items():
        then = before.get(key)
        cpu = 0.0
        if then is not None and now["time"] > then["time"]:
            cpu = 100 * (now["cpu_seconds"] - then["cpu_seconds"]) / (now["time"] - then["time"])
        limit = now["memory_limit_bytes"] or 1
        rows.append({"name": now["name"], "id": now["id"], "state": now["state"],
                     "cpu_percent": round(max(cpu, 0.0), 2), "cpus": now["cpus"],
                     "memory_bytes": now["memory_bytes"],
                     "memory_limit_bytes": now["memory_limit_bytes"],
                     "memory_percent": round(100 * now["memory_bytes"] / limit, 2),
                     "storage_read_bytes": now["storage_read_bytes"],
                     "storage_write_bytes": now["storage_write_bytes"],
                     "network_rx_bytes": now.get("network_rx_bytes"),
                     "network_tx_bytes": now.get("network_tx_bytes")})
    return sorted(rows, key=lambda r: r["name"])


def _table(rows: list[dict[str, Any]]) -> list[str]:
    out = [("NAME", "ID", "CPU %", "MEM USAGE / LIMIT", "MEM %", "NET I/O", "BLOCK I/O")]
    for r in rows:
        net = "--" if r["network_rx_bytes"] is None else \
            f"{_human(r['network_rx_bytes'])} / {_human(r['network_tx_bytes'] or 0)}"
        out.append((r["name"], r["id"][:12], f"{r['cpu_percent']:.2f}%",
                    f"{_mib(r['memory_bytes'])} / {_mib(r['memory_limit_bytes'])}",
                    f"{r['memory_percent']:.2f}%", net,
                    f"{_human(r['storage_read_bytes'])} / {_human(r['storage_write_bytes'])}"))
    widths = [max(len(x[i]) for x in out) for i in range(len(out[0]))]
    return ["  ".join(v.ljust(w) for v, w in zip(x, widths, strict=True)).rstrip()
            for x in out]


def cmd_stats(args: argparse.Namespace) -> int:
    before = _readings(args.names)
    while True:
        time.sleep(INTERVAL)
        after = _readings(args.names)
        rows = _rows(before, after)
        if args.json:
            print(json.dumps(rows, indent=2 if args.no_stream else None), flush=True)
        else:
            lines = _table(rows)
            if not args.no_stream and sys.stdout.isatty():
                sys.stdout.write("\033[H\033[J")  # like docker stats: redraw in place
            print("\n".join(lines), flush=True)
        if args.no_stream:
            return 0
        before = after


def cmd_top(args: argparse.Namespace) -> int:
    from ember.cli.wire import Wire, quote_name

    with Wire() as w:
        doc = w.call("GET", f"/v1/machines/{quote_name(args.name)}/top")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    rows = [doc["titles"], *doc["processes"]]
    if not doc["titles"]:
        return 0
    n = len(doc["titles"])
    widths = [max(len(r[i]) for r in rows if len(r) > i) for i in range(n - 1)]
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)]
        print("  ".join([*cells, r[-1] if len(r) == n else ""]).rstrip())
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from ember.cli.wire import Wire, quote_name

    with Wire() as w:
        doc = w.call("GET", f"/v1/machines/{quote_name(args.name)}/changes")
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for c in doc:
        print(f"{c['kind']} {c['path']}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from ember.cli.wire import Wire

    machines = set()
    for f in args.filter:
        key, sep, value = f.partition("=")
        if key.strip() not in ("machine", "name") or not sep:
            raise EmberError(f"--filter {f!r}: expected machine=NAME")
        machines.add(value.strip())
    params: dict[str, Any] = {"follow": not args.no_follow}
    since_time: float | None = None
    if args.seq is not None:
        params["since"] = args.seq
    elif args.since is not None:
        since_time = args.since
        params["since"] = 0  # the whole log, filtered by time here
    with Wire() as w, w.lines("GET", "/v1/events", params=params) as lines:
        for line in lines:
            ev = json.loads(line)
            if machines and ev.get("machine") not in machines \
                    and ev.get("machine_id") not in machines:
                continue
            if since_time is not None and _when(ev) < since_time:
                continue
            if args.json:
                print(json.dumps(ev), flush=True)
            else:
                detail = f" ({ev['detail']})" if ev.get("detail") else ""
                print(f"{ev['time']} #{ev['seq']} machine {ev['machine']} {ev['type']}{detail}",
                      flush=True)
    return 0


def _when(ev: dict[str, Any]) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(ev["time"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return 0.0


def _since(value: str) -> float:
    from ember.cli.logs import parse_since

    return parse_since(value)


def _seq(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: give the sequence number of an event "
                                         "(events after it are replayed)")
    return int(value)


def register(sub: Any) -> None:
    p = sub.add_parser("stats", help="live CPU, memory and I/O of running machines",
                       description="What each running machine (or each NAME) costs the "
                       "host, refreshed every second like docker stats: CPU %% (100 %% = one "
                       "host CPU), memory used and given, the guest's network bytes, host "
                       "storage read/written.")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--no-stream", action="store_true", help="one reading, then exit")
    p.add_argument("--json", action="store_true",
                   help="JSON: an array with --no-stream, else one array per line")
    p.set_defaults(func=pipe_safe(cmd_stats))

    p = sub.add_parser("top", help="list a machine's guest processes")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=pipe_safe(cmd_top))

    p = sub.add_parser("diff", help="list what a running machine changed in its root "
                       "(A added, C changed, D deleted)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=pipe_safe(cmd_diff))

    p = sub.add_parser("events", help="the daemon's machine events, as they happen",
                       description="Machine events (created, started, stopped, ...) as they "
                       "happen (until Ctrl-C); with --since or --seq the recorded ones first "
                       "(--no-follow: only those).")
    p.add_argument("--since", type=_since, metavar="TIME",
                   help="replay events since TIME: 10m, 1h30m, a Unix time, or "
                   "2026-12-01T08:00:00Z")
    p.add_argument("--seq", type=_seq, metavar="SEQ",
                   help="replay events after the one numbered SEQ (each line shows its #seq)")
    p.add_argument("--no-follow", action="store_true", help="only the recorded events")
    p.add_argument("-f", "--filter", action="append", default=[], metavar="machine=NAME")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=pipe_safe(cmd_events))
