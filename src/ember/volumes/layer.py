"""A machine's writable root layer on disk: a sparse ext4 image under the overlay.

By default the writable layer over a machine's image is guest memory (tmpfs):
gone at every stop. A daemon machine gets a layer on disk instead
(``--rootfs-size``, default 10 GiB, sparse: it takes on the host what the
guest wrote), which keeps its changes across stop and start until the machine
is removed, like a Docker container's; ``--tmpfs-root`` keeps the memory
layer. ``ember run`` keeps memory by default (its machine is removed at exit)
and takes ``--rootfs-size`` for a guest that writes more than its RAM.

The layer is the virtio-blk disk after the image (``/dev/vdb``); the agent
mounts it at its late root (``rw=/dev/vdb``) and puts the overlay's upper and
work directories on it. It is never mounted on the host. Made at the
machine's first start (a sparse copy of an empty ext4 made once per size,
``empty_layer``, or of the layer of the snapshot a clone starts from); a user
snapshot of the machine copies it while the guest is paused
(``vmm/snapshot.py``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.volumes.store import VolumeError, make_ext4

DEFAULT_SIZE = 10 << 30
MIN_SIZE = 64 << 20
MAX_SIZE = 16 << 40
#: Its name in a daemon machine's directory, in a state dir (``ember run``), in a snapshot.
LAYER_FILE = "rootfs.img"


@dataclass(frozen=True)
class RootLayer:
    path: Path
    size: int = DEFAULT_SIZE

    def __post_init__(self) -> None:
        check_size(self.size)

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "size": self.size}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> RootLayer | None:
        return None if not d else cls(Path(d["path"]), int(d["size"]))

    def ensure(self, source: Path | None = None) -> None:
        """Make the layer if it is not there: a copy of ``source`` (a snapshot's), else an
        empty ext4. Made under a temporary name: a crash leaves no half layer.

        Raises:
            VolumeError: it cannot be made.
        """
        if self.path.exists():
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            from ember.vmm.snapshot import copy_sparse

            copy_sparse(source if source is not None else empty_layer(self.size), tmp, 0o600)
            os.rename(tmp, self.path)
        except OSError as exc:
            raise VolumeError(f"cannot make the root layer {self.path}: {exc.strerror}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def disk_bytes(self) -> int:
        try:
            return os.stat(self.path).st_blocks * 512
        except OSError:
            return 0


def empty_layer(size: int) -> Path:
    """An empty ext4 of ``size`` bytes to copy layers from, made once per size in the cache:
    ``mkfs.ext4`` takes most of a second (its writes are synced), a sparse copy of its
    few MiB a few ms. The copies share the file system's UUID, which nothing reads (a
    layer is only ever mounted by its own guest).

    Raises:
        VolumeError: mkfs.ext4 failed.
    """
    from ember import paths

    d = paths.cache_dir() / "layers"
    path = d / f"ext4-{size}.img"
    if path.exists():
        return path
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".ext4-{size}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    try:
        make_ext4(tmp, size, "ember-root")
        os.replace(tmp, path)  # a racing maker made the same: either is right
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_size(size: int) -> int:
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise VolumeError(f"a root layer's size must be between {MIN_SIZE >> 20} MiB and "
                          f"{MAX_SIZE >> 40} TiB, not {size} bytes")
    return size
