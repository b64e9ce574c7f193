"""Host shares: a host directory shared live with the guest over virtio-9p.

``-v HOSTDIR:/path[:ro]`` (a first part with a ``/``, or starting with ``.``, is a
host directory; a plain name is a volume, as in Docker). However many a
machine has, they take one virtio-mmio transport: QEMU exports one directory,
``SHARES_ROOT`` inside its jail, whose entries ``0``, ``1``, ... are the shares,
each bound in by bubblewrap (``host/jail.py``). The guest agent mounts that
export once, binds each entry at its path and lets go of the export itself, so
the guest sees its shares and nothing else of the export.

What a share exposes is exactly its directory:

* the bind covers ``HOSTDIR`` and nothing above it (``..`` at a share's top
  stays in the export, which holds only this machine's shares), and not the
  file systems mounted below it;
* QEMU's 9p server never follows a symlink on the host: a symlink in the share
  reaches the guest as a symlink, which the guest resolves in its own file
  system. And QEMU sees no more of the host than its jail anyway;
* ``:ro`` is enforced on the host (a read-only mount), not only in the guest.

Ownership: QEMU serves the share with ``security_model=none``, with its own
uid. As root that uid is the jail's (2000000000 + slot), and the share is
bound through an idmapped mount (``host/idmap.py``) that maps the share
directory's owner to it: QEMU can do in the share what the directory's owner
can, and what the guest creates belongs on the host to that owner. Files of
other host users are read as "other" (they show as uid 65534 in the guest)
and cannot be changed. Without root, QEMU runs as the user: what the guest
creates is the user's. In the guest, the owner's files show as QEMU's uid
and guest ``chown`` is ignored: the guest's root acts as the owner, other
guest users get what the mode bits give everyone. A guest sets the mode bits
of what it creates, but never setuid or setgid bits (``host/modefilter.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.errors import EmberError

#: QEMU's 9p export inside its jail: ``SHARES_ROOT/N`` is the machine's share N.
SHARES_ROOT = "/ember-shares"
#: The 9p mount tag the agent looks for.
MOUNT_TAG = "ember.shares"
#: Shares one machine may have (bounded by the kernel command line they travel on).
MAX_PER_MACHINE = 32


class ShareError(EmberError):
    pass


@dataclass(frozen=True)
class ShareMount:
    """A host directory (absolute, symlinks resolved) and where the guest sees it."""

    source: Path
    target: str
    readonly: bool = False

    def __str__(self) -> str:
        return f"{self.source}:{self.target}" + (":ro" if self.readonly else "")

    def to_json(self) -> dict[str, Any]:
        return {"source": str(self.source), "target": self.target, "readonly": self.readonly}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShareMount:
        return cls(Path(d["source"]), str(d["target"]), bool(d["readonly"]))


def is_host_path(text: str) -> bool:
    """Whether the first part of a ``-v`` names a host directory rather than a volume."""
    return "/" in text or text.startswith(".") or text.startswith("~")


def share(source: str, target: str, readonly: bool = False, *,
          cwd: str | None = None) -> ShareMount:
    """A share of ``source`` (relative to ``cwd``), checked: it must be a directory.

    Raises:
        ShareError: no such directory, or a bad target.
    """
    from ember.volumes.store import VolumeError, check_target

    path = os.path.expanduser(source)
    if not os.path.isabs(path):
        path = os.path.join(cwd or os.getcwd(), path)
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        what = "is not a directory" if os.path.exists(real) else "does not exist"
        raise ShareError(f"cannot share {source}: it {what}")
    if real == "/":
        raise ShareError("cannot share the host's root directory")
    from ember import paths

    home = os.path.realpath(paths.data_dir())
    if _within(real, home) or _within(home, real):
        raise ShareError(f"cannot share {source}: Ember's data directory ({home}, its "
                         "machines, volumes and database) may not be in a share")
    try:
        return ShareMount(Path(real), check_target(target), readonly)
    except VolumeError as exc:
        raise ShareError(str(exc)) from None


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def check_source(m: ShareMount) -> None:
    """Before a start: the directory is still there. Raises ShareError."""
    if not m.source.is_absolute() or not m.source.is_dir() or m.source.is_symlink():
        raise ShareError(f"cannot share {m.source}: it is not a directory any more")


def cmdline_param(shares: tuple[ShareMount, ...]) -> str:
    """``ember.shares=0:/src:rw,1:/cfg:ro``: the export's entries and their paths."""
    if not shares:
        return ""
    return "ember.shares=" + ",".join(f"{i}:{m.target}:{'ro' if m.readonly else 'rw'}"
                                      for i, m in enumerate(shares))
