"""The image store's side of a pull (``images/registry/pull.py``): the work directory
a pull unpacks in, where its downloads grow, and the commit of what it fetched.

A pull's work directory (``pulls/pull-*``) is flocked while the pull runs; the
store's sweep removes those whose lock is free (their pull died). Downloads
(``downloads/<hex>.part``) stay across pulls so that an interrupted one resumes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ember.errors import ImageError
from ember.images import oci
from ember.images.rootfs import rmtree
from ember.util import Progress, atomic_write

if TYPE_CHECKING:
    from ember.images.store import ImageStore, Imported, Layer


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


@dataclass(frozen=True)
class PulledImage:
    """What a pull fetched and built, for :meth:`ImageStore.add_pulled`."""

    config_digest: str
    config_bytes: bytes
    manifest_digest: str
    manifest_bytes: bytes
    layers: tuple[Layer, ...]
    #: digest -> verified download file, for each layer not already in the store
    blob_files: Mapping[str, Path]
    rootfs: Path  #: the built EROFS image, on the store's file system
    tag: str | None  #: the tag it gets (Docker's familiar form: ``alpine:latest``)
    repo_digest: str  #: ``docker.io/library/alpine@sha256:…``
    pulled_as: str  #: ``docker.io/library/alpine:latest``


def dead_pulls(store: ImageStore) -> list[Path]:
    """Work directories of pulls whose process is gone (their lock is free)."""
    dead = []
    with contextlib.suppress(FileNotFoundError):
        for d in store.pulls_dir.iterdir():
            try:
                with open(d / "lock", "rb") as f:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a pull under way
            except OSError:  # no lock file: one starting now, or killed while it started
                with contextlib.suppress(OSError):
                    if time.time() - d.stat().st_mtime < 60:
                        continue
            dead.append(d)
    return dead


@contextlib.contextmanager
def pull_workspace(store: ImageStore) -> Iterator[Path]:
    """A private work directory for a pull (unpacked tree, rootfs under construction),
    locked for as long as the pull runs, removed afterwards or by the next sweep."""
    store.pulls_dir.mkdir(parents=True, exist_ok=True)
    store.downloads_dir.mkdir(parents=True, exist_ok=True)
    ws = Path(tempfile.mkdtemp(dir=store.pulls_dir, prefix="pull-"))
    try:
        with open(ws / "lock", "wb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            yield ws
    finally:
        rmtree(ws)


def download_path(store: ImageStore, digest: str) -> Path:
    """Where a blob being downloaded grows (kept across pulls, so a download resumes)."""
    return store.downloads_dir / f"{_hex(oci.check_digest(digest))}.part"


def add_pulled(store: ImageStore, pulled: PulledImage,
               say: Progress | None = None) -> Imported:
    """Commit what a pull fetched and built: blobs (renamed in from their download
    files), config, manifest, root file system, the record and its tag.

    An image already in the store (pulled meanwhile, or under another name) only
    gains the tag and the repository digest. On failure the store is as before.
    """
    from ember.images.store import Imported  # noqa: F811 (at run time)

    say = say or (lambda _m: None)
    tags = [pulled.tag] if pulled.tag else []
    with store._locked():
        record_path = store._record_path(pulled.config_digest)
        rec = store._load_record(record_path)
        if rec is not None:
            digests = list(rec.get("repo_digests") or ())
            if pulled.repo_digest not in digests:
                digests.append(pulled.repo_digest)
            rec["repo_digests"] = sorted(digests)
            rec["pulled_as"] = pulled.pulled_as
            atomic_write(record_path, json.dumps(rec, indent=1).encode())
            moved = store._add_tags(pulled.config_digest, tags)
            return Imported(store.resolve(pulled.config_digest), moved, new=False)
        if not pulled.layers:
            raise ImageError(f"image {_hex(pulled.config_digest)[:12]} was removed while "
                             "it was pulled: pull it again")
        with store._transaction(pulled.config_digest) as txn:
            for layer in pulled.layers:
                final = store.blob_path(layer.digest)
                if final.exists():
                    continue
                part = pulled.blob_files[layer.digest]
                os.chmod(part, 0o444)
                os.replace(part, final)
                txn.created.append(final)
            store._put_bytes(pulled.config_bytes, "config", txn.created, txn.temps)
            store._put_bytes(pulled.manifest_bytes, "manifest", txn.created, txn.temps)
            store._fsync_dir(store.blobs_dir)
            rootfs = store.rootfs_dir / f"{_hex(pulled.config_digest)}.erofs"
            os.replace(pulled.rootfs, rootfs)
            txn.created.append(rootfs)
            moved = txn.record(pulled.config_digest, pulled.manifest_digest,
                               pulled.config_bytes, oci.parse_config(pulled.config_bytes),
                               pulled.layers, tags, repo_digests=[pulled.repo_digest],
                               pulled_as=pulled.pulled_as)
        image = store.resolve(pulled.config_digest)
        say(f"pulled {image.short_id}" + (f" as {', '.join(image.tags)}" if image.tags
                                           else ""))
        return Imported(image, moved)
