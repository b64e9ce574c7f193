"""One line of an NDJSON stream (exec, events, pulls): a JSON object without its null
fields, and a newline."""

from __future__ import annotations

import json
from typing import Any


def line(obj: dict[str, Any]) -> bytes:
    return (json.dumps({k: v for k, v in obj.items() if v is not None}) + "\n").encode()
