"""``POST /v1/machines/{name}/commit``: a running machine's root changes as a new image
(``images/commit.py``), in the daemon's store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ember.daemon.errors import Conflict
from ember.errors import EmberError

if TYPE_CHECKING:
    from ember.daemon.managed import Managed
    from ember.images.store import Image


def commit_machine(mm: Managed, tag: str | None, comment: str = "") -> Image:
    """The new image. Raises Conflict: not running, a clone, or the guest failed."""
    from ember.images.commit import CommitError, commit

    if mm.doc.get("snapshot"):
        raise Conflict(f"machine {mm.name} is a clone of a snapshot: commit an image "
                       "machine (its changes are those since its snapshot's machine booted)")
    machine = mm.running_machine("commit")
    image = mm.image()
    layer = machine.spec.layer
    # what the guest could have written at most: its layer, or its memory
    limit = (layer.size if layer is not None else machine.spec.memory_mib << 20) + (64 << 20)
    try:
        return commit(machine, mm.mgr.store, image, tag, limit=limit, comment=comment)
    except CommitError as exc:
        raise Conflict(f"machine {mm.name}: {exc}") from None
    except EmberError as exc:  # the store refused it, as an import would be
        raise Conflict(f"machine {mm.name}: cannot commit: {exc}") from None
