"""Resolving a path inside a directory tree that is hostile, one component at a time.

Both image layers (``images/unpack.py``) and archives copied out of a guest
(``files.py``) are extracted by code that must never write outside its root,
whatever symlinks earlier entries planted. This is the one walk they share:
each component is ``lstat``-ed under the real directories resolved so far; a
symlink is followed only while it stays inside (relative, and ``..`` never
climbing above the root). Callers turn the exceptions into their own errors.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

#: Symlinks followed in one resolution at most (Linux's own limit).
MAX_SYMLINK_HOPS = 40


class PathEscapes(Exception):
    """A symlink on the way leads outside the root (absolute, or ``..`` above it)."""


class TooManySymlinks(Exception):
    """More than ``max_hops`` symlinks on the way (a loop, most likely)."""


class NotADirectory(Exception):
    """A component on the way is neither a directory nor a symlink; ``shown`` names it."""

    def __init__(self, shown: str) -> None:
        super().__init__(shown)
        self.shown = shown


def resolve_inside(root: Path, parts: tuple[str, ...], *, create: bool, mode: int = 0o755,
                   max_hops: int = MAX_SYMLINK_HOPS) -> tuple[str, ...] | None:
    """The real directory components under ``root`` that ``parts`` names.

    Missing directories are created with ``mode`` when ``create``; otherwise a
    missing one gives ``None``.

    Raises:
        PathEscapes, TooManySymlinks, NotADirectory.
    """
    todo = list(parts)
    done: list[str] = []  # real directories only, relative to root
    hops = 0
    while todo:
        comp = todo.pop(0)
        if comp == "..":  # only ever from a symlink target
            if not done:
                raise PathEscapes()
            done.pop()
            continue
        host = root.joinpath(*done, comp)
        try:
            st = os.lstat(host)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(host, mode)
            done.append(comp)
            continue
        if stat.S_ISDIR(st.st_mode):
            done.append(comp)
        elif stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > max_hops:
                raise TooManySymlinks()
            target = os.readlink(host)
            if target.startswith("/"):
                raise PathEscapes()
            todo = [t for t in target.split("/") if t not in ("", ".")] + todo
        else:
            raise NotADirectory("/".join((*done, comp)))
    return tuple(done)
