"""``ember commit``: a running machine's root changes as a new image on top of its image.

Nothing a guest wrote is ever mounted on the host: the guest's tool streams a
tar of its root overlay's upper layer (``files.stream_upper_layer``) and lists
the image's entries hidden by a directory the machine replaced (an opaque
directory, which a tar of the layer cannot show: ``changes.hidden_entries``). Ember turns
that into an OCI layer -- a whiteout (a character device 0:0) becomes an
empty ``.wh.NAME``, each hidden entry one more, the files the agent writes at
every start (``changes.AGENT_FILES``) are left out -- and imports an OCI
layout of the image's layers plus that one, with the image's config (its
``rootfs.diff_ids`` and ``history`` extended), into the store: the same
import, checks and root file system build as any image's.

The tar is untrusted: names are normalised and anything absolute, with
``..``, or of a type a layer may not hold is refused; its size is bounded by
the machine's writable layer (``limit``). The machine goes on running: what
it writes meanwhile may be caught half-way, as with ``docker commit
--pause=false``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from ember.errors import EmberError
from ember.images import oci

if TYPE_CHECKING:
    from ember.images.store import Image, ImageStore
    from ember.machine import Machine



class CommitError(EmberError):
    pass


def commit(machine: Machine, store: ImageStore, image: Image, tag: str | None, *,
           limit: int, comment: str = "") -> Image:
    """The new image: ``image`` plus what ``machine`` changed in its root, tagged ``tag``.

    Raises:
        CommitError: the guest could not give its changes, or they are malformed.
        ImageError: the store refused the result (as for any import).
    """
    from ember.changes import hidden_entries
    from ember.files import CopyError, stream_upper_layer

    with tempfile.TemporaryDirectory(prefix="ember-commit-", dir=store.root) as tmp:
        work = Path(tmp)
        raw = work / "upper.tar"
        with open(raw, "wb") as f:
            def write(data: bytes) -> None:
                f.write(data)

            try:
                stream_upper_layer(machine, write, limit=limit)
            except CopyError as exc:
                raise CommitError(str(exc)) from None
        try:
            hidden = hidden_entries(machine)
        except EmberError as exc:
            raise CommitError(str(exc)) from None
        layout = work / "layout"
        build_layout(store, image, raw, hidden, layout, comment=comment)
        return store.import_path(layout, tag=tag)


def build_layout(store: ImageStore, image: Image, upper_tar: Path, hidden: Iterable[str],
                 layout: Path, *, comment: str = "") -> None:
    """An OCI layout of ``image``'s layers plus one made of ``upper_tar`` and ``hidden``."""
    from ember.changes import AGENT_FILES

    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layer_tmp = layout / "layer.tmp"
    diff = hashlib.sha256()
    with open(layer_tmp, "wb") as out:
        hasher = _Hashing(out)
        with gzip.GzipFile(fileobj=hasher, mode="wb", mtime=0) as gz:
            tee = _Hashing(gz, diff)
            with tarfile.open(fileobj=cast(IO[bytes], tee), mode="w|",
                              format=tarfile.PAX_FORMAT) as dst:
                _convert(upper_tar, dst, hidden, {p.lstrip("/") for p in AGENT_FILES})
    layer_digest = "sha256:" + hasher.hash.hexdigest()
    os.rename(layer_tmp, blobs / hasher.hash.hexdigest())
    layers: list[dict[str, Any]] = []
    for x in image.layers:
        dest = blobs / x.digest.split(":", 1)[1]
        if not dest.exists():
            try:
                os.link(store.blob_path(x.digest), dest)
            except OSError:
                shutil.copyfile(store.blob_path(x.digest), dest)
        layers.append({"mediaType": x.media_type, "digest": x.digest, "size": x.size})
    layers.append({"mediaType": oci.OCI_LAYER_GZIP, "digest": layer_digest,
                   "size": hasher.size})
    config = store.config_document(image)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs.setdefault("diff_ids", []).append("sha256:" + diff.hexdigest())
    config.setdefault("history", []).append(
        {"created": now, "created_by": "ember commit", **({"comment": comment} if comment
                                                           else {})})
    config["created"] = now
    cfg = _put(blobs, json.dumps(config, separators=(",", ":")).encode())
    manifest = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cfg[0], "size": cfg[1]},
                "layers": layers}
    man = _put(blobs, json.dumps(manifest, separators=(",", ":")).encode())
    (layout / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": oci.OCI_INDEX,
        "manifests": [{"mediaType": oci.OCI_MANIFEST, "digest": man[0], "size": man[1]}]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')


def _convert(upper_tar: Path, dst: tarfile.TarFile, hidden: Iterable[str],
             skip: set[str]) -> None:
    """Copy the guest's tar into ``dst`` as an OCI layer (see the module doc)."""
    seen: set[str] = set()
    with tarfile.open(upper_tar, mode="r:") as src:
        for m in src:
            name = _name(m.name)
            if name is None or name in skip:
                continue
            if m.ischr() and m.devmajor == 0 and m.devminor == 0:  # an overlay whiteout
                parent, base = posixpath.split(name)
                _empty(dst, posixpath.join(parent, ".wh." + base))
                continue
            if not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.ischr()
                    or m.isblk() or m.isfifo()):
                raise CommitError(f"the machine's changes hold {name!r} of an unknown type")
            if posixpath.basename(name).startswith(".wh."):
                raise CommitError(f"the machine's changes hold {name!r}: a name reserved "
                                  "for whiteouts")
            if m.islnk():
                target = _name(m.linkname)
                if target is None or target not in seen:
                    raise CommitError(f"the machine's changes hold a hard link {name!r} to "
                                      "a file that is not in them")
                m.linkname = target
            m.name = name
            seen.add(name)
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
    for path in sorted(set(hidden)):
        name = _name(path.lstrip("/"))
        if name is not None and name not in skip:
            parent, base = posixpath.split(name)
            _empty(dst, posixpath.join(parent, ".wh." + base))


def _name(raw: str) -> str | None:
    """A member's name relative to the root, or None for the root itself.

    Raises:
        CommitError: an absolute name (after ``./``) or one with ``..``.
    """
    name = raw[2:] if raw.startswith("./") else raw
    name = name.rstrip("/")
    if name in ("", "."):
        return None
    if name.startswith("/") or ".." in name.split("/"):
        raise CommitError(f"the machine's changes hold an unsafe name {raw!r}")
    return posixpath.normpath(name)


def _empty(dst: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = 0
    info.mode = 0o644
    dst.addfile(info)


def _put(blobs: Path, data: bytes) -> tuple[str, int]:
    h = hashlib.sha256(data).hexdigest()
    (blobs / h).write_bytes(data)
    return "sha256:" + h, len(data)


class _Hashing:
    """A write-only file that hashes what passes through to ``inner`` (and counts it)."""

    def __init__(self, inner: IO[bytes] | Any, hash: Any = None) -> None:
        self.inner = inner
        self.hash = hash if hash is not None else hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.inner.write(data)
        return len(data)

    def flush(self) -> None:
        self.inner.flush()
