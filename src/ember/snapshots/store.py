"""Where snapshots live: immutable directories, written under a temporary name.

    ROOT/<id>/manifest.json   validated on every read (snapshots/manifest.py)
    ROOT/<id>/state           QEMU's device state (hash in the manifest)
    ROOT/<id>/memory          the guest's RAM, sparse; clones map it privately
    ROOT/<id>/used            touched on every start (least-recently-used eviction)
    ROOT/.tmp-<id>/           a snapshot being written; renamed into place whole

User snapshots are kept under the data dir, boot snapshots (``ember run``'s
warm starts, one per machine shape) under the cache dir; both are this class.

A clone's QEMU holds a shared ``flock`` on the ``memory`` file it maps for as
long as it runs (``vmm/process.py``), so "is anyone using this snapshot" is an
exclusive, non-blocking ``flock``: it holds across processes and survives the
death of whoever started the clone. A crash while writing leaves a ``.tmp-``
directory, removed by the next store that finds it unlocked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ember.snapshots.manifest import ID_RE, Manifest, SnapshotError, sha256_bytes
from ember.util import log
from ember.vmm.snapshot import MEMORY_FILE, STATE_FILE
from ember.vmm.spec import RestoreSpec
from ember.volumes.layer import LAYER_FILE

MANIFEST = "manifest.json"
USED = "used"
TMP_PREFIX = ".tmp-"


class SnapshotInUse(SnapshotError):
    """A snapshot cannot be removed: a running clone maps its memory."""


class SnapshotNotFound(SnapshotError):
    """No snapshot has that id, id prefix or tag."""


@dataclass(frozen=True)
class Snapshot:
    manifest: Manifest
    path: Path

    @property
    def id(self) -> str:
        return self.manifest.id

    def restore_spec(self) -> RestoreSpec:
        """The files a clone starts from, checked first (sizes, and the state's hash).

        Raises:
            SnapshotError: a file is missing, truncated or corrupted.
        """
        m = self.manifest
        what = f"snapshot {m.tag or m.short_id}"
        state, memory = self.path / STATE_FILE, self.path / MEMORY_FILE
        try:
            data = state.read_bytes()
            mem_size = memory.stat().st_size
        except OSError as exc:
            raise SnapshotError(f"{what} is damaged: {Path(exc.filename or '?').name} "
                                f"is unreadable ({exc.strerror})") from None
        if len(data) != m.state_size or sha256_bytes(data) != m.state_sha256:
            raise SnapshotError(f"{what} is damaged: its device state does not match its "
                                "manifest (truncated or corrupted)")
        if mem_size != m.memory_size:
            raise SnapshotError(f"{what} is damaged: its memory file is {mem_size} bytes, "
                                f"not {m.memory_size}")
        layer = None
        if self.layer_size and m.kind == "user":  # its machine's root layer, copied
            layer = self.path / LAYER_FILE
            try:
                size = layer.stat().st_size
            except OSError:
                raise SnapshotError(f"{what} is damaged: its root layer is missing") from None
            if size != self.layer_size:
                raise SnapshotError(f"{what} is damaged: its root layer is {size} bytes, not "
                                    f"{self.layer_size}")
        return RestoreSpec(m.id, memory, state, layer=layer)

    @property
    def layer_size(self) -> int:
        """The size of its machine's root layer on disk (0: the layer was guest memory)."""
        for d in self.manifest.devices:
            if d.startswith("virtio-blk:layer:"):
                with contextlib.suppress(ValueError):
                    return int(d.rsplit(":", 1)[1])
        return 0

    def touch(self) -> None:
        with contextlib.suppress(OSError):
            (self.path / USED).touch()

    def last_used(self) -> float:
        try:
            return (self.path / USED).stat().st_mtime
        except OSError:
            return 0.0


class SnapshotStore:
    def __init__(self, root: Path, kind: str) -> None:
        self.root = root
        self.kind = kind

    # -- reading

    def all(self) -> list[Snapshot]:
        """Every valid snapshot, oldest first; broken ones are logged and skipped."""
        out = []
        for path in self._dirs():
            try:
                out.append(self._load(path))
            except SnapshotError as exc:
                log.warning("%s", exc)
        return sorted(out, key=lambda s: s.manifest.created)

    def get(self, ref: str) -> Snapshot:
        """A snapshot by id, unique id prefix, or tag.

        Raises:
            SnapshotNotFound: no match; SnapshotError: ambiguous, or its manifest is bad.
        """
        if ID_RE.fullmatch(ref) and (self.root / ref).is_dir():
            return self._load(self.root / ref)
        snaps = self.all()
        for s in snaps:
            if s.manifest.tag and s.manifest.tag == ref:
                return s
        matches = [s for s in snaps if ref and s.id.startswith(ref.lower())
                   and all(c in "0123456789abcdef" for c in ref.lower())]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise SnapshotError(f"snapshot id prefix {ref!r} is ambiguous: "
                                f"{', '.join(s.manifest.short_id for s in matches)}")
        raise SnapshotNotFound(f"no snapshot {ref!r} (ember snapshot ls lists them)")

    def find(self, snapshot_id: str) -> Snapshot | None:
        """The snapshot with exactly this id, if it is here and valid."""
        path = self.root / snapshot_id
        if not ID_RE.fullmatch(snapshot_id) or not path.is_dir():
            return None
        try:
            return self._load(path)
        except SnapshotError as exc:
            log.warning("%s", exc)
            return None

    def _load(self, path: Path) -> Snapshot:
        where = f"snapshot {path.name[:12]}"
        try:
            doc = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise SnapshotError(f"{where} is damaged: it has no manifest") from None
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"{where} is damaged: its manifest is unreadable ({exc})") \
                from None
        m = Manifest.from_json(doc, where=f"{where}: manifest")
        if m.id != path.name:
            raise SnapshotError(f"{where} is damaged: its manifest names another snapshot")
        return Snapshot(m, path)

    def _dirs(self) -> Iterator[Path]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for e in entries:
            if e.is_dir(follow_symlinks=False) and ID_RE.fullmatch(e.name):
                yield Path(e.path)

    def size_on_disk(self) -> int:
        return sum(s.manifest.size_on_disk for s in self.all())

    # -- writing

    def new_tmp(self, snap_id: str | None = None) -> tuple[str, Path, int]:
        """An id (``snap_id``, else a fresh one) and its temporary directory, locked
        (``flock``) while being written.

        Returns the id, the directory and the lock's descriptor (``commit`` or
        ``discard`` closes it).
        """
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.clean_tmp()
        snap_id = snap_id or secrets.token_hex(16)
        tmp = self.root / f"{TMP_PREFIX}{snap_id}-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        lock = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(lock, fcntl.LOCK_EX)
        return snap_id, tmp, lock

    def commit(self, tmp: Path, lock: int, manifest: Manifest) -> Snapshot:
        """Make the snapshot written in ``tmp`` durable, then visible under its id.

        The files are synced before the manifest is written and the directory
        renamed, so a crash at any point leaves either no snapshot or a whole one.

        Raises:
            SnapshotError: the tag is taken (the temporary directory is removed).
        """
        try:
            for name in (STATE_FILE, MEMORY_FILE, LAYER_FILE):
                if name == LAYER_FILE and not (tmp / name).exists():
                    continue
                _fsync(tmp / name)
            with self._locked():
                if manifest.tag and any(s.manifest.tag == manifest.tag for s in self.all()):
                    raise SnapshotError(f"a snapshot tagged {manifest.tag!r} exists already "
                                        "(ember snapshot rm it, or choose another tag)")
                data = json.dumps(manifest.to_json(), indent=2).encode()
                fd = os.open(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o444)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                (tmp / USED).touch()
                final = self.root / manifest.id
                try:
                    os.rename(tmp, final)
                except OSError as exc:
                    if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    # another writer committed the same id first (two first runs
                    # of one machine shape): theirs stands
                    self.discard(tmp, lock)
                    return self._load(final)
                _fsync(self.root)  # the rename itself
        except BaseException:
            self.discard(tmp, lock)
            raise
        os.close(lock)
        return Snapshot(manifest, final)

    def discard(self, tmp: Path, lock: int) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(lock)

    def clean_tmp(self) -> None:
        """Remove what a killed writer left (temporary directories nobody holds locked)."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for e in entries:
            if not e.name.startswith((TMP_PREFIX, ".trash-")):
                continue
            try:
                fd = os.open(e.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # being written right now
            shutil.rmtree(e.path, ignore_errors=True)
            os.close(fd)

    # -- removing

    def in_use(self, snap: Snapshot) -> bool:
        """Whether a running clone maps this snapshot's memory."""
        try:
            with _unused(snap.path, snap.manifest.tag or snap.manifest.short_id):
                return False
        except SnapshotInUse:
            return True

    def remove(self, ref: str) -> Manifest | None:
        """Delete a snapshot that no running clone uses; None: it was damaged (and is gone).

        Raises:
            SnapshotNotFound: no such snapshot. SnapshotInUse: a clone maps its memory.
        """
        path = self.root / ref
        if ID_RE.fullmatch(ref) and path.is_dir():
            try:
                snap = self._load(path)
            except SnapshotError:
                # a damaged one can still be removed (unless a clone maps it)
                self._remove(path, ref[:12])
                return None
        else:
            snap = self.get(ref)
        self._remove(snap.path, snap.manifest.tag or snap.manifest.short_id)
        return snap.manifest

    def _remove(self, path: Path, name: str) -> None:
        with _unused(path, name):
            self._delete(path)

    def _delete(self, path: Path) -> None:
        trash = self.root / f".trash-{path.name}"
        os.rename(path, trash)  # gone from every listing at once
        shutil.rmtree(trash, ignore_errors=True)

    def evict(self, cap_bytes: int, keep: str = "") -> list[str]:
        """Remove least recently used snapshots (not in use, not ``keep``) beyond ``cap_bytes``."""
        snaps = sorted(self.all(), key=lambda s: s.last_used())
        total = sum(s.manifest.size_on_disk for s in snaps)
        removed = []
        for s in snaps:
            if total <= cap_bytes:
                break
            if s.id == keep:
                continue
            try:
                self._remove(s.path, s.id[:12])
            except (SnapshotInUse, OSError):
                continue
            total -= s.manifest.size_on_disk
            removed.append(s.id)
        return removed

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


@contextlib.contextmanager
def _unused(path: Path, name: str) -> Iterator[None]:
    """Hold the snapshot at ``path`` exclusively: no clone maps it meanwhile.

    Raises:
        SnapshotInUse: a running clone holds its shared lock on the memory file.
    """
    try:
        fd = os.open(path / MEMORY_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # no memory file: nothing can map it
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise SnapshotInUse(f"snapshot {name} is in use by running clones: stop or remove "
                                "them first") from None
        yield
    finally:
        os.close(fd)


def disk_usage(path: Path) -> int:
    """Bytes a directory's files occupy on disk (allocated blocks, not apparent sizes)."""
    total = 0
    for e in os.scandir(path):
        with contextlib.suppress(OSError):
            total += e.stat(follow_symlinks=False).st_blocks * 512
    return total


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
