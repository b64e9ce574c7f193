"""httpx, imported without its command line.

``import httpx`` also imports httpx's own command-line client (click, rich and
pygments: about 100 ms) unless that import fails. Ember never runs it, so every
Ember module takes httpx from here, which makes that import fail first.
"""

import sys

sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

import httpx as httpx  # noqa: E402

__all__ = ["httpx"]
