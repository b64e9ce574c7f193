"""``ember diff``: what a running machine changed in its root, read from its overlay.

The guest's root is an overlay of the image under a writable layer (guest
memory, or a disk: ``volumes/layer.py``). The agent keeps both layers open
when it enters the root (``/proc/1/fd/900``, the upper, and ``901``, the
image: out of the root's sight, reachable through those links), and the
host-sent tool (busybox) walks the upper one: a whiteout (a character device
0:0) is a deletion, an entry the image has too a change, any other an
addition. The files the agent writes itself at every start (``/etc/hostname``,
``/etc/hosts``, ``/etc/resolv.conf``) are left out, as Docker leaves out its
bind-mounted ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.machine import Machine

#: Written by the agent at every start, not by the machine's processes.
AGENT_FILES = frozenset({"/etc/hostname", "/etc/hosts", "/etc/resolv.conf"})
KINDS = ("A", "C", "D")
#: How many changes are listed at most (the walk is cut there).
MAX_CHANGES = 100_000

_WALK = r"""
U=/proc/1/fd/900 L=/proc/1/fd/901
[ -d $U/ ] || { echo "no overlay layers: the machine's agent predates ember diff" >&2; exit 3; }
cd $U/ && find . -mindepth 1 -exec sh -c '
for p; do
  q=${p#.}
  if [ -c "$p" ] && [ "$(stat -c %t:%T "$p")" = 0:0 ]; then echo "D $q"
  elif [ -e "$0/$p" ] || [ -L "$0/$p" ]; then echo "C $q"
  else echo "A $q"; fi
done' $L {} +
"""


#: Lists, one per line, the image's entries a replaced (opaque) directory hides:
#: overlayfs marks such a directory with an xattr, which the tool cannot read, so
#: an entry of the image's directory that is neither in the upper one nor seen.
_HIDDEN = r"""
U=/proc/1/fd/900 L=/proc/1/fd/901
cd $U/ && find . -mindepth 1 -type d -exec sh -c '
L=$0
for d; do
  [ -d "$L/$d" ] || continue
  find "$L/$d" -mindepth 1 -maxdepth 1 | while IFS= read -r e; do
    n=${e##*/}
    { [ -e "$d/$n" ] || [ -L "$d/$n" ]; } && continue
    m=${d#.}/$n
    [ -e "$m" ] || [ -L "$m" ] || echo "$m"
  done
done' $L {} +
"""



class ChangesError(EmberError):
    pass


@dataclass(frozen=True, order=True)
class Change:
    path: str
    kind: str  # "A" added, "C" changed, "D" deleted

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "kind": self.kind}


def changes(machine: Machine, timeout: float = 60.0) -> list[Change]:
    """What the running ``machine`` added, changed and deleted in its root, by path.

    Raises:
        ChangesError: the guest cannot say (an agent older than this, or the walk failed).
    """
    from ember.files import run_tool

    code, out, err = run_tool(machine, ["sh", "-c", _WALK], limit=64 << 20, timeout=timeout)
    if code != 0:
        raise ChangesError(f"machine {machine.name}: cannot list its changes: "
                           f"{err or f'exit code {code}'}")
    text = out.decode("utf-8", "surrogateescape")
    return parse(text + "".join(f"D {p}\n" for p in hidden_entries(machine, timeout)))


def hidden_entries(machine: Machine, timeout: float = 60.0) -> list[str]:
    """The image's paths a directory the machine replaced hides (deleted, as whiteouts are).

    Raises:
        ChangesError: the walk failed.
    """
    from ember.files import run_tool

    code, out, err = run_tool(machine, ["sh", "-c", _HIDDEN], limit=16 << 20, timeout=timeout)
    if code != 0:
        raise ChangesError(f"machine {machine.name}: cannot list its replaced directories: "
                           f"{err or f'exit code {code}'}")
    return [p for p in out.decode("utf-8", "surrogateescape").splitlines()
            if p.startswith("/")]


def parse(text: str) -> list[Change]:
    """The walk's lines as changes, sorted by path, the agent's own files left out."""
    found: list[Change] = []
    for line in text.splitlines():
        kind, sep, path = line.partition(" ")
        if not sep or kind not in KINDS or not path.startswith("/") or path in AGENT_FILES:
            continue
        found.append(Change(path, kind))
        if len(found) >= MAX_CHANGES:
            break
    # /etc changed only because the agent wrote its own files there: not a change
    paths = {c.path for c in found}
    found = [c for c in found if not (c.kind == "C" and c.path == "/etc"
                                      and not any(p.startswith("/etc/") for p in paths))]
    return sorted(found)
