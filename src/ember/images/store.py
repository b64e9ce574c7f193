"""The content-addressed image store.

Layout under the store root (``ember.paths.images_dir()`` by default)::

    lock                      flock'ed around every mutation
    refs.json                 {"tag": "sha256:<config hex>"}
    blobs/sha256/<hex>        immutable blobs (layers, configs, manifests)
    images/<config hex>.json  one record per image: id, manifest_digest, layers
                              (digest, media_type, size, diff_id), diff_ids,
                              config (the JSON), tags, created, imported, size
    rootfs/<config hex>.erofs the unpacked image as a read-only EROFS image
    tmp/                      scratch space for rootfs builds

An image's id is its config digest. Blobs are written to a temporary name in
their final directory, fsynced, verified and renamed, so a blob that exists is
complete and correct. A failed import leaves the store as it was: blobs it
added, its record and its tags are removed again.

Removal follows Docker: removing a tag untags, and the image goes with its last
tag unless a machine uses it (then the removal needs ``force``, and the image
stays, untagged, until :meth:`ImageStore.prune` finds it unused). The store does
not know machines: callers pass ``users`` (image id -> names of the machines
using it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ember import paths
from ember.errors import (
    AmbiguousImage,
    ImageConflict,
    ImageError,
    ImageNotFound,
)
from ember.images import oci
from ember.images.oci import normalize_tag
from ember.images.rootfs import build_rootfs, human_size, rmtree
from ember.images.sources import (
    READ_ERRORS,
    ImportPlan,
    Source,
    archive_tags,
    open_source,
    plan_docker,
    plan_oci,
    sniff_media_type,
)
from ember.util import Progress, atomic_write, log

_HEX_RE = re.compile(r"^[0-9a-f]{1,64}$")
_BLOB_NAME_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20

def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Layer:
    digest: str  #: blob digest (compressed, as stored)
    media_type: str
    size: int  #: blob size in bytes
    diff_id: str  #: digest of the uncompressed tar
    unpacked_size: int


@dataclass(frozen=True)
class Image:
    """An image in the store."""

    id: str  #: ``sha256:<hex>`` of the image config
    tags: tuple[str, ...]
    config: oci.ImageConfig
    layers: tuple[Layer, ...]
    size: int  #: uncompressed size of all layers
    created: str  #: RFC 3339, from the image config (else the import time)
    manifest_digest: str | None = None
    imported: str = field(default="", compare=False)
    #: ``NAME@DIGEST`` for each registry reference it was pulled as (the digest the
    #: registry serves for it: an index's where the tag named an index).
    repo_digests: tuple[str, ...] = ()
    #: The canonical reference of its last pull (``docker.io/library/alpine:latest``).
    pulled_as: str | None = None

    @property
    def hex(self) -> str:
        return _hex(self.id)

    @property
    def short_id(self) -> str:
        return self.hex[:12]


@dataclass(frozen=True)
class TagMove:
    """A tag an import or ``tag`` took from another image (as Docker does, silently there)."""

    tag: str
    from_id: str  #: the image that had it (now without it; untagged if it was its last)
    to_id: str


@dataclass(frozen=True)
class Imported:
    """What :meth:`ImageStore.import_archive` did."""

    image: Image
    moved: tuple[TagMove, ...] = ()
    new: bool = True  #: False: the image was in the store already (only tags were added)


@dataclass(frozen=True)
class Removal:
    """What :meth:`ImageStore.remove` or :meth:`ImageStore.prune` did."""

    untagged: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()  #: image ids
    reclaimed: int = 0  #: bytes freed on disk (blobs, root file systems, records)


#: Who uses which image: image id -> names of the machines using it.
Users = Mapping[str, Sequence[str]]


def tag_moved_message(move: TagMove) -> str:
    """``tag app:1 moved from image 1a2b3c4d5e6f``: one line for the user."""
    return f"tag {move.tag} moved from image {_hex(move.from_id)[:12]}"


@dataclass
class _Transaction:
    """What :meth:`ImageStore._transaction` undoes on failure."""

    store: ImageStore
    record_path: Path
    old_refs: dict[str, str]
    created: list[Path] = field(default_factory=list)
    temps: list[Path] = field(default_factory=list)
    wrote_record: bool = False

    def record(self, image_id: str, manifest_digest: str | None, config_bytes: bytes,
               info: oci.ConfigInfo, layers: Sequence[Layer], tags: Sequence[str],
               **extra: Any) -> tuple[TagMove, ...]:
        """Write the image's record and give it ``tags``; the tags taken from others."""
        now = _now()
        record = {
            "id": image_id,
            "manifest_digest": manifest_digest,
            "layers": [{"digest": x.digest, "media_type": x.media_type, "size": x.size,
                        "diff_id": x.diff_id, "unpacked_size": x.unpacked_size}
                       for x in layers],
            "diff_ids": list(info.diff_ids),
            "config": json.loads(config_bytes),
            "tags": sorted(set(tags)),
            "created": info.created or now,
            "imported": now,
            "size": sum(x.unpacked_size for x in layers),
            **extra,
        }
        self.wrote_record = True
        atomic_write(self.record_path, json.dumps(record, indent=1).encode())
        return self.store._add_tags(image_id, tags)


# --- the store ---------------------------------------------------------------------


class ImageStore:
    """Images imported from OCI layouts and docker archives; see the module doc."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else paths.images_dir()
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.images_dir = self.root / "images"
        self.rootfs_dir = self.root / "rootfs"
        self.tmp_dir = self.root / "tmp"
        self.refs_path = self.root / "refs.json"
        self.lock_path = self.root / "lock"
        self.pulls_dir = self.root / "pulls"
        self.downloads_dir = self.root / "downloads"
        self._lock_depth = 0
        self._lock_file: IO[bytes] | None = None
        # one thread at a time holds the store (the flock below is per open file)
        self._thread_lock = threading.RLock()

    # --- plumbing -------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            with self._flocked():
                yield

    @contextlib.contextmanager
    def _flocked(self) -> Iterator[None]:
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        for d in (self.blobs_dir, self.images_dir, self.rootfs_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "ab") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                self._sweep()
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _sweep(self) -> None:
        from ember.images.pulled import dead_pulls
        from ember.images.rootfs import sweep_memory_scratch

        sweep_memory_scratch()
        """Delete temporaries left by a killed process (all writers hold the lock)."""
        leftovers = [*self.blobs_dir.glob(".tmp-*"), *self.rootfs_dir.glob(".*.tmp"),
                     *self.tmp_dir.iterdir(), *dead_pulls(self)]
        for p in leftovers:
            log.info("removing leftover %s", p)
            if p.is_dir() and not p.is_symlink():
                rmtree(p)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def has_image(self, image_id: str) -> bool:
        return self._record_path(image_id).exists()

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / _hex(oci.check_digest(digest))

    def _record_path(self, image_id: str) -> Path:
        return self.images_dir / f"{_hex(image_id)}.json"

    def config_document(self, image: Image) -> dict[str, Any]:
        """The image's config as it was imported (a JSON object, a copy).

        Raises:
            ImageNotFound: the image is gone.
        """
        rec = self._load_record(self._record_path(image.id))
        if rec is None or not isinstance(rec.get("config"), dict):
            raise ImageNotFound(f"image {image.short_id} is not in the store")
        return dict(json.loads(json.dumps(rec["config"])))

    def rootfs_path(self, image: Image) -> Path:
        """Where the image's EROFS root file system is (or will be) cached."""
        return self.rootfs_dir / f"{image.hex}.erofs"

    def _read_refs(self) -> dict[str, str]:
        try:
            data = self.refs_path.read_bytes()
        except FileNotFoundError:
            return {}
        refs = oci.load_json(data, f"{self.refs_path}")
        if not isinstance(refs, dict):
            raise ImageError(f"{self.refs_path} is corrupt")
        return {str(k): str(v) for k, v in refs.items()}

    def _write_refs(self, refs: dict[str, str]) -> None:
        atomic_write(self.refs_path, json.dumps(dict(sorted(refs.items())), indent=1).encode())

    def _load_record(self, path: Path) -> dict[str, Any] | None:
        try:
            rec = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("ignoring corrupt image record %s", path)
            return None
        return rec if isinstance(rec, dict) else None

    def _image(self, rec: dict[str, Any], refs: dict[str, str]) -> Image:
        image_id = str(rec["id"])
        config = oci.ImageConfig.from_json(rec.get("config") or {})
        layers = tuple(
            Layer(x["digest"], x["media_type"], int(x["size"]), x["diff_id"],
                  int(x.get("unpacked_size", 0)))
            for x in rec.get("layers", [])
        )
        return Image(
            id=image_id,
            tags=tuple(sorted(t for t, i in refs.items() if i == image_id)),
            config=config,
            layers=layers,
            size=int(rec.get("size", 0)),
            created=str(rec.get("created") or rec.get("imported") or ""),
            manifest_digest=rec.get("manifest_digest"),
            imported=str(rec.get("imported", "")),
            repo_digests=tuple(str(d) for d in rec.get("repo_digests") or ()),
            pulled_as=rec.get("pulled_as"),
        )

    def _records(self) -> list[dict[str, Any]]:
        if not self.images_dir.is_dir():
            return []
        out = []
        for p in sorted(self.images_dir.glob("*.json")):
            rec = self._load_record(p)
            if rec is not None and "id" in rec:
                out.append(rec)
        return out

    def _ingest(self, src: IO[bytes], expect: str | None, expect_size: int | None,
                what: str, created: list[Path], temps: list[Path]) -> tuple[str, int, Path]:
        """Copy a stream into the blob dir under a temp name; verify; return digest/size/temp."""
        fd, tmp_name = tempfile.mkstemp(dir=self.blobs_dir, prefix=".tmp-")
        tmp = Path(tmp_name)
        temps.append(tmp)
        h = hashlib.sha256()
        n = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    n += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except READ_ERRORS as exc:
            raise ImageError(f"{what} is corrupt or truncated: {exc}") from exc
        digest = "sha256:" + h.hexdigest()
        if expect is not None and digest != expect:
            raise ImageError(f"{what} {expect} does not match its digest (got {digest})")
        if expect_size is not None and n != expect_size:
            raise ImageError(f"{what} {expect} has {n} bytes, expected {expect_size}")
        os.chmod(tmp, 0o444)
        return digest, n, tmp

    def _commit_blob(self, tmp: Path, digest: str, created: list[Path],
                     temps: list[Path]) -> None:
        final = self.blob_path(digest)
        if final.exists():
            tmp.unlink()
        else:
            os.replace(tmp, final)
            created.append(final)
        temps.remove(tmp)

    def _put_bytes(self, data: bytes, what: str, created: list[Path],
                   temps: list[Path]) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.blob_path(digest).exists():
            return digest
        digest, _, tmp = self._ingest(io.BytesIO(data), digest, len(data), what, created, temps)
        self._commit_blob(tmp, digest, created, temps)
        return digest

    def _fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- import ------------------------------------------------------------------

    def import_path(self, path: Path, tag: str | None = None,
                    progress: Progress | None = None) -> Image:
        """:meth:`import_archive`, returning only the image."""
        return self.import_archive(path, tag, progress).image

    def import_archive(self, path: Path, tag: str | None = None,
                       progress: Progress | None = None) -> Imported:
        """Import an OCI layout (dir or tar) or a ``docker save`` tarball (or dir).

        Tags: ``tag`` if given, else the archive's RepoTags or ref.name
        annotation. A tag another image had moves to this one (as in Docker);
        the result lists such moves (:func:`tag_moved_message` words them for the
        user). Importing an image already in the store only adds tags.

        Raises:
            ImageError: bad or hostile input; the store is left as it was.
        """
        say = progress or (lambda _m: None)
        wanted = normalize_tag(tag) if tag is not None else None
        src = open_source(Path(path))
        try:
            say(f"reading {path}")
            if src.exists("oci-layout") and src.exists("index.json"):
                plan = plan_oci(src)
            elif src.exists("manifest.json"):
                plan = plan_docker(src, wanted)
            else:
                raise ImageError(
                    f"{path} is neither an OCI image layout nor a docker save archive")
            tags = [wanted] if wanted else archive_tags(plan.tags)
            info = oci.parse_config(plan.config_bytes)
            with self._locked():
                existing = self._load_record(self._record_path(plan.config_digest))
                if existing is not None:
                    moved = self._add_tags(plan.config_digest, tags)
                    say(f"image {plan.config_digest[:19]}… is already in the store")
                    return Imported(self.resolve(plan.config_digest), moved, new=False)
                return self._import_new(src, plan, info, tags, say)
        finally:
            src.close()

    def _import_new(self, src: Source, plan: ImportPlan, info: oci.ConfigInfo, tags: list[str],
                    say: Progress) -> Imported:
        if len(info.diff_ids) != len(plan.layers):
            raise ImageError(f"image config lists {len(info.diff_ids)} diff_ids but the "
                             f"manifest has {len(plan.layers)} layers")
        with self._transaction(plan.config_digest) as txn:
            created, temps = txn.created, txn.temps
            layers: list[Layer] = []
            n = len(plan.layers)
            for i, (lp, diff_id) in enumerate(zip(plan.layers, info.diff_ids, strict=True)):
                what = f"layer {i + 1}/{n}"
                if not src.exists(lp.name):
                    raise ImageError(f"{src.description} is missing {what} ({lp.name})")
                size_note = f" ({human_size(lp.size)})" if lp.size is not None else ""
                say(f"importing layer {i + 1}/{n}{size_note}")
                with src.open(lp.name) as f:
                    digest, size, tmp = self._ingest(f, lp.digest, lp.size, what, created,
                                                     temps)
                media_type = lp.media_type
                if media_type is None:
                    with open(tmp, "rb") as f:
                        media_type = sniff_media_type(f.read(4))
                oci.layer_compression(media_type)  # a type Ember can apply
                self._commit_blob(tmp, digest, created, temps)
                layers.append(Layer(digest, media_type, size, diff_id, 0))
            self._put_bytes(plan.config_bytes, "config", created, temps)
            if plan.manifest_bytes is not None:
                self._put_bytes(plan.manifest_bytes, "manifest", created, temps)
            self._fsync_dir(self.blobs_dir)
            # Unpack now, not on first run: a layer that is only hostile in context
            # (a symlink made by one entry or layer, a path through it in another)
            # is caught here and the import fails whole, leaving the store as it was.
            # Unpacking also checks each layer against its diff_id, in the same read.
            sizes = [0] * len(layers)
            created.append(build_rootfs(
                [(self.blob_path(x.digest), x) for x in layers],
                self.rootfs_dir / f"{_hex(plan.config_digest)}.erofs", scratch=self.tmp_dir,
                say=say, on_layer=lambda i, scan: sizes.__setitem__(i, scan.size)))
            layers = [dataclasses.replace(x, unpacked_size=n)
                      for x, n in zip(layers, sizes, strict=True)]
            moved = txn.record(plan.config_digest, plan.manifest_digest, plan.config_bytes,
                               info, layers, tags)
        image = self.resolve(plan.config_digest)
        say(f"imported {image.short_id}" + (f" as {', '.join(image.tags)}" if image.tags else ""))
        return Imported(image, moved)

    @contextlib.contextmanager
    def _transaction(self, image_id: str) -> Iterator[_Transaction]:
        """Adding an image, all or nothing: on any failure the files it created, its
        temporaries, its record and its tags go again. Lock held."""
        txn = _Transaction(self, self._record_path(image_id), self._read_refs())
        try:
            yield txn
        except BaseException:
            for p in txn.temps + txn.created:
                with contextlib.suppress(OSError):
                    p.unlink()
            if txn.wrote_record:
                with contextlib.suppress(OSError):
                    txn.record_path.unlink()
                with contextlib.suppress(OSError, ImageError):
                    if self._read_refs() != txn.old_refs:
                        self._write_refs(txn.old_refs)
            raise

    def _add_tags(self, image_id: str, tags: Sequence[str]) -> tuple[TagMove, ...]:
        """Point ``tags`` at ``image_id``; the tags taken from other images. Lock held."""
        if not tags:
            return ()
        refs = self._read_refs()
        moved = tuple(TagMove(t, refs[t], image_id) for t in dict.fromkeys(tags)
                      if t in refs and refs[t] != image_id)
        for t in tags:
            refs[t] = image_id
        self._write_refs(refs)
        for other in {m.from_id for m in moved} | {image_id}:
            self._sync_record_tags(other, refs)
        return moved

    def _sync_record_tags(self, image_id: str, refs: dict[str, str]) -> None:
        path = self._record_path(image_id)
        rec = self._load_record(path)
        if rec is None:
            return
        tags = sorted(t for t, i in refs.items() if i == image_id)
        if rec.get("tags") != tags:
            rec["tags"] = tags
            atomic_write(path, json.dumps(rec, indent=1).encode())

    def tag(self, ref: str, tag: str) -> Image:
        """Give the image ``ref`` resolves to the tag ``tag`` (moving it if needed).

        An image that loses its last tag this way stays, untagged, for :meth:`prune`.
        """
        t = normalize_tag(tag)
        with self._locked():
            image = self.resolve(ref)
            self._add_tags(image.id, [t])
            return self.resolve(image.id)

    # --- queries -------------------------------------------------------------

    def list(self) -> list[Image]:
        """All images, newest import first."""
        refs = self._read_refs()
        images = [self._image(r, refs) for r in self._records()]
        return sorted(images, key=lambda i: (i.imported, i.id), reverse=True)

    def resolve(self, ref: str) -> Image:
        """Find an image by tag (``name`` means ``name:latest``), id, any unique prefix
        of an id (with or without ``sha256:``), or manifest digest. A tag wins over an
        id prefix of the same spelling, as in Docker.

        Raises:
            ImageNotFound: nothing matches.
            AmbiguousImage: an id prefix matches several images.
        """
        return self._lookup(ref)[0]

    def _lookup(self, ref: str) -> tuple[Image, str | None]:
        """:meth:`resolve`, and the tag ``ref`` named (None: it named the id)."""
        ref = ref.strip()
        refs = self._read_refs()
        bare = ref[len("sha256:"):] if ref.startswith("sha256:") else None
        if bare is None:
            try:
                tag = normalize_tag(ref)
            except ImageError:
                tag = None
            if tag is not None and tag in refs:
                rec = self._load_record(self._record_path(refs[tag]))
                if rec is not None:
                    return self._image(rec, refs), tag
        if bare is None and "@" in ref:
            found = self._by_repo_digest(ref)
            if found is not None:
                return self._image(found, refs), None
        prefix = bare if bare is not None else ref
        if _HEX_RE.match(prefix):
            if len(prefix) == 64:
                rec = self._load_record(self.images_dir / f"{prefix}.json")
                if rec is not None:
                    return self._image(rec, refs), None
                # a manifest digest (what registries and skopeo show) names it too
                for rec in self._records():
                    if rec.get("manifest_digest") == f"sha256:{prefix}":
                        return self._image(rec, refs), None
            else:
                matches = [r for r in self._records() if _hex(str(r["id"])).startswith(prefix)]
                if len(matches) > 1:
                    raise AmbiguousImage(f"image id prefix {ref!r} is ambiguous: "
                                         f"{len(matches)} images match (give more of the id)")
                if matches:
                    return self._image(matches[0], refs), None
        raise ImageNotFound(f"image {ref!r} not found (ember image ls lists the store; "
                            "ember image import PATH adds an OCI layout or docker-save tar)")

    def _by_repo_digest(self, ref: str) -> dict[str, Any] | None:
        """The record of ``NAME@sha256:…``: pulled under that name with that digest."""
        from ember.images.reference import parse

        try:
            r = parse(ref)
        except ImageError:
            return None
        if r.digest is None:
            return None
        want = f"{r.name}@{r.digest}"
        for rec in self._records():
            if want in (rec.get("repo_digests") or ()):
                return rec
        return None

    # --- removal -------------------------------------------------------------

    def remove(self, ref: str, *, force: bool = False, users: Users | None = None) -> Removal:
        """``docker rmi``: untag, and delete the image once it has no tag and no user.

        ``ref`` a tag: that tag goes; the image goes too if it was its last tag.
        ``ref`` an id (or prefix, or manifest digest): all its tags and the image go;
        an image with several tags needs ``force``. An image a machine uses (in
        ``users``) is never deleted: without ``force`` the removal is refused,
        with it the tags go and the image stays, untagged, for :meth:`prune`.

        Raises:
            ImageNotFound: nothing matches ``ref``.
            AmbiguousImage: an id prefix matches several images.
            ImageConflict: the removal needs ``force``, or (forced) would do nothing.
        """
        users = users or {}
        with self._locked():
            image, tag = self._lookup(ref)
            using = list(users.get(image.id, ()))
            name = tag or image.short_id
            untag = [tag] if tag is not None else list(image.tags)
            last = set(untag) >= set(image.tags)
            if tag is None and len(image.tags) > 1 and not force:
                raise ImageConflict(
                    f"image {image.short_id} has {len(image.tags)} tags "
                    f"({', '.join(image.tags)}): remove them by name, or force to remove all")
            if last and using and not force:
                raise ImageConflict(
                    f"image {name} is used by machine {using[0]}"
                    + (f" (and {len(using) - 1} more)" if len(using) > 1 else "")
                    + ": remove the machine first, or force to untag the image (it stays "
                    "until no machine uses it)")
            if last and using and not untag:
                raise ImageConflict(f"image {name} is used by machine {using[0]} and has no "
                                    "tags to remove: remove the machine first")
            deleted = (image.id,) if last and not using else ()
            self._untag(untag, deleting=deleted)
            return Removal(tuple(untag), deleted, self._delete(deleted) if deleted else 0)

    def prune(self, *, all: bool = False, users: Users | None = None) -> Removal:
        """Delete the images without tags that no machine uses (``all``: every image no
        machine uses, tags and all), and whatever a killed removal left behind.

        Never raises for an image in use: it is kept.
        """
        used = {image_id for image_id, names in (users or {}).items() if names}
        with self._locked():
            refs = self._read_refs()
            tagged = set(refs.values())
            doomed = [str(r["id"]) for r in self._records()
                      if str(r["id"]) not in used and (all or str(r["id"]) not in tagged)]
            untag = sorted(t for t, i in refs.items() if i in doomed)
            self._untag(untag, deleting=doomed)
            reclaimed = self._delete(doomed)
            return Removal(tuple(untag), tuple(doomed), reclaimed)

    def _untag(self, tags: Iterable[str], deleting: Iterable[str] = ()) -> None:
        """Drop ``tags`` from refs.json and from the records of their images (but those
        about to be deleted: refs.json is what counts). Lock held."""
        refs = self._read_refs()
        gone = {t: refs.pop(t) for t in list(tags) if t in refs}
        if not gone:
            return
        self._write_refs(refs)
        for image_id in set(gone.values()) - set(deleting):
            self._sync_record_tags(image_id, refs)

    def _delete(self, image_ids: Sequence[str]) -> int:
        """Delete images (records, root file systems) and the blobs no other image needs;
        bytes freed. Lock held, tags already dropped.

        Also collects what a removal killed halfway left behind (blobs and root file
        systems of no record; no import is under way, imports hold the lock too),
        unless some record is unreadable: then only the deleted images' own blobs go.
        """
        freed = 0
        doomed: set[str] = set()
        for image_id in image_ids:
            path = self._record_path(image_id)
            doomed |= self._blobs_of(self._load_record(path) or {"id": image_id})
            freed += _unlink(path)
        needed: set[str] = set()
        for r in self._records():
            needed |= self._blobs_of(r)
        names = {p.stem for p in self.images_dir.glob("*.json")}
        readable = len(names) == len({_hex(str(r["id"])) for r in self._records()})
        if readable:
            doomed |= {f"sha256:{p.name}" for p in self.blobs_dir.iterdir()
                       if _BLOB_NAME_RE.match(p.name)}
        for digest in doomed - needed:
            freed += _unlink(self.blob_path(digest))
        for p in self.rootfs_dir.glob("*.erofs"):
            if p.name.removesuffix(".erofs") not in names:
                freed += _unlink(p)
        return freed

    @staticmethod
    def _blobs_of(rec: dict[str, Any]) -> set[str]:
        out = {str(layer["digest"]) for layer in rec.get("layers", [])}
        for key in ("id", "manifest_digest"):
            if rec.get(key):
                out.add(str(rec[key]))
        return out

    # --- root file system ----------------------------------------------------------

    def rootfs(self, image: Image, progress: Progress | None = None) -> Path:
        """The image's read-only root file system (EROFS), built on first use and cached.

        Raises:
            ImageError: a layer is corrupt, hostile, or does not match its diff_id.
            BuildError: mkfs.erofs failed.
        """
        final = self.rootfs_path(image)
        if final.exists():
            return final
        say = progress or (lambda _m: None)
        with self._locked():
            if final.exists():
                return final
            return self._build_rootfs(image.hex, image.layers, say)

    def _build_rootfs(self, image_hex: str, layers: Sequence[Layer], say: Progress) -> Path:
        """Unpack ``layers`` in order and build ``rootfs/<image_hex>.erofs``. Lock held.

        Raises:
            ImageError: a layer is corrupt, hostile, or does not match its diff_id.
            BuildError: mkfs.erofs failed.
        """
        return build_rootfs([(self.blob_path(layer.digest), layer) for layer in layers],
                            self.rootfs_dir / f"{image_hex}.erofs", scratch=self.tmp_dir,
                            say=say)


def _unlink(path: Path) -> int:
    """Remove a file; the bytes it held (0 if it was not there)."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size
