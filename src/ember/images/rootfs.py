"""An image's root file system: its layers unpacked in order into a tree, made an EROFS image.

The tree is scratch space (removed afterwards); the image is written under a
temporary name next to its final path, fsynced, made read-only and renamed into
place, so a root file system that exists is complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.errors import BuildError, EmberError
from ember.images import oci
from ember.images.unpack import LayerScan, skipped_message, unpack_layer
from ember.util import Progress, log, run

if TYPE_CHECKING:
    from ember.images.store import Layer

#: Directories the guest agent mounts over; created in every rootfs if missing.
MOUNT_POINTS = (("dev", 0o755), ("proc", 0o755), ("sys", 0o755), ("run", 0o755),
                ("tmp", 0o1777), ("etc", 0o755))


def human_size(n: int) -> str:
    """``1234567`` -> ``"1.2 MB"``."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


#: Unpacked trees in memory are named ``ember-unpack-<pid>-...`` (swept when <pid> is gone).
MEMORY_PREFIX = "ember-unpack-"
#: Where an unpacked tree may go instead of the disk: a tmpfs, when it has room to spare.
MEMORY_DIR = Path("/dev/shm")


def _unpacked_estimate(layer: Layer) -> int:
    if layer.unpacked_size:
        return layer.unpacked_size
    compressed = oci.layer_compression(layer.media_type) != "none"
    return layer.size * (5 if compressed else 1)


def memory_scratch(estimate: int) -> Path | None:
    """A tmpfs directory for an unpacked tree of about ``estimate`` bytes, if one has room
    for twice that and 1 GiB besides; None: unpack on disk.

    Creating thousands of files costs a disk file system far more than a tmpfs (here
    1.0 s of a 1.6 s ``tar -x``); the tree only lives until mkfs.erofs has read it.
    ``EMBER_UNPACK_IN_MEMORY=0`` turns this off.
    """
    if os.environ.get("EMBER_UNPACK_IN_MEMORY", "1") == "0":
        return None
    try:
        st = os.statvfs(MEMORY_DIR)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if free < 2 * estimate + (1 << 30) or not os.access(MEMORY_DIR, os.W_OK | os.X_OK):
        return None
    return MEMORY_DIR


def sweep_memory_scratch() -> None:
    """Remove unpacked trees in memory left by processes that died (SIGKILL)."""
    with contextlib.suppress(OSError):
        for d in MEMORY_DIR.glob(f"{MEMORY_PREFIX}*"):
            pid = d.name[len(MEMORY_PREFIX):].split("-", 1)[0]
            if (pid.isdigit() and not os.path.exists(f"/proc/{pid}")
                    and d.lstat().st_uid == os.geteuid()):
                rmtree(d)


def build_rootfs(layers: Sequence[tuple[Path | Callable[[], Path], Layer]], final: Path, *,
                 scratch: Path, say: Progress,
                 on_layer: Callable[[int, LayerScan], None] | None = None) -> Path:
    """Unpack ``layers`` (blob file, layer) in order into a tree under ``scratch`` and
    build the EROFS image ``final`` (named ``<image hex>.erofs``) from it.

    A blob file may be given as a function that returns it once it is there (a
    pull unpacks each layer as soon as it and those below it are downloaded).
    ``on_layer(i, scan)`` is told what each layer held once it is applied.

    Raises:
        ImageError: a layer is corrupt, hostile, or does not match its diff_id.
        BuildError: mkfs.erofs failed.
    """
    image_hex = final.name.removesuffix(".erofs")
    short = image_hex[:12]
    fast = memory_scratch(sum(_unpacked_estimate(layer) for _, layer in layers))
    tree = Path(tempfile.mkdtemp(dir=fast or scratch,
                                 prefix=f"{MEMORY_PREFIX}{os.getpid()}-{short}-" if fast
                                 else f"unpack-{short}-"))
    fd, out_name = tempfile.mkstemp(dir=final.parent, prefix=f".{image_hex}.", suffix=".tmp")
    os.close(fd)
    out = Path(out_name)
    try:
        os.chmod(tree, 0o755)
        n = len(layers)
        for i, (source, layer) in enumerate(layers):
            path = source if isinstance(source, Path) else source()
            size = f" ({human_size(layer.unpacked_size)})" if layer.unpacked_size else ""
            say(f"unpacking layer {i + 1}/{n}{size}")
            scan = unpack_layer(path, tree, compression=oci.layer_compression(layer.media_type),
                                name=layer.digest, diff_id=layer.diff_id)
            if scan.skipped:
                log.warning("%s", skipped_message(scan, layer.digest[:19] + "…"))
            if on_layer is not None:
                on_layer(i, scan)
        ensure_mount_points(tree)
        say(f"building rootfs for sha256:{short}… (erofs)")
        fs_uuid = str(uuid.UUID(bytes=bytes.fromhex(image_hex[:32])))
        try:
            # Without root the unpacked tree is all ours; "root owns all" is
            # closer to the image than "the host user owns all".
            owner = [] if os.geteuid() == 0 else ["--all-root"]
            run(["mkfs.erofs", "--quiet", *owner, "-U", fs_uuid, out, tree])
        except EmberError as exc:
            raise BuildError(f"building rootfs for {short} failed: {exc}") from exc
        with open(out, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(out, 0o444)
        os.replace(out, final)
    finally:
        rmtree(tree)
        with contextlib.suppress(FileNotFoundError):
            out.unlink()
    return final


def ensure_mount_points(tree: Path) -> None:
    """Create the directories the guest agent mounts over, where nothing is in the way."""
    for name, mode in MOUNT_POINTS:
        path = tree / name
        if os.path.lexists(path):
            continue
        os.mkdir(path)
        os.chmod(path, mode)
        if os.geteuid() == 0:
            os.lchown(path, 0, 0)


def rmtree(path: Path) -> None:
    """Remove a tree even when some directories in it are read-only (non-root runs)."""

    def fix(func: Any, p: str, exc: BaseException) -> None:
        if isinstance(exc, PermissionError) or (
            isinstance(exc, OSError) and exc.errno == errno.EACCES
        ):
            parent = os.path.dirname(p)
            with contextlib.suppress(OSError):
                os.chmod(parent, stat.S_IRWXU)
                if os.path.isdir(p) and not os.path.islink(p):
                    os.chmod(p, stat.S_IRWXU)
            func(p)
        elif not isinstance(exc, FileNotFoundError):
            raise exc

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=lambda f, p, ei: fix(f, p, ei[1]))
