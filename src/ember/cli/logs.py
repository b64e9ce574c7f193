"""``ember logs``: a machine's main-process output (or its console), like ``docker logs``."""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from ember.cli.common import pipe_safe, write_all

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, now: float | None = None) -> float:
    """``--since``: a duration before now (``10m``, ``1h30m``, ``90s``), a Unix time
    (``1764578400``), or an RFC 3339 / ISO 8601 time (``2026-12-01T08:00:00Z``; no zone:
    local). Unix seconds out."""
    from datetime import datetime

    text = value.strip()
    now = time.time() if now is None else now
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    else:
        if pos == len(text) and pos:
            return now - total
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a time: use a duration (10m, 1h30m), a Unix time or "
            "2026-12-01T08:00:00Z") from None


def _tail(value: str) -> int:
    if value == "all":
        return 0
    if not value.isascii() or not value.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of lines (or 'all')")
    return int(value)


def cmd_logs(args: argparse.Namespace) -> int:
    from ember.cli.wire import Wire, quote_name

    params: dict[str, Any] = {"source": "console" if args.console else "output",
                              "follow": args.follow, "tail": args.tail}
    if args.since is not None:
        params["since"] = args.since
    if args.timestamps:
        params["timestamps"] = True
    with Wire() as w, w.lines("GET", f"/v1/machines/{quote_name(args.name)}/logs",
                              params=params, raw=True) as chunks:
        for chunk in chunks:
            write_all(1, chunk)
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("logs", help="print a machine's output (or its console)",
                       description="The main process's stdout and stderr as it wrote them "
                       "(kept across restarts, at most about 2 MiB: the newest). --console: "
                       "the guest's serial console (kernel messages) of its last boot.")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until it stops")
    p.add_argument("--console", action="store_true", help="the serial console instead")
    p.add_argument("-n", "--tail", type=_tail, default=0, metavar="N",
                   help="only the last N lines (default: all)")
    p.add_argument("--since", type=parse_since, metavar="TIME",
                   help="only lines since TIME: 10m, 1h30m, a Unix time, or "
                   "2026-12-01T08:00:00Z")
    p.add_argument("-t", "--timestamps", action="store_true",
                   help="prefix each line with the time it arrived (RFC 3339, UTC)")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=pipe_safe(cmd_logs))
