"""Reading image archives: OCI layouts and ``docker save`` tarballs, as dirs or tars.

:func:`plan_oci` and :func:`plan_docker` work out what an archive holds (config,
manifest, layer files and their expected digests, tags) without copying anything.

A :class:`Source` gives read access to named files inside the thing being
imported, whatever its packaging. Names come from untrusted JSON, so they are
checked: no absolute paths, no ``..``, nothing resolving outside a directory.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from ember.errors import ImageError
from ember.images import oci
from ember.images.oci import normalize_tag
from ember.util import log

#: Largest JSON document (index, manifest, config) read into memory.
MAX_JSON_BYTES = 8 << 20

READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def _clean_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ImageError(f"invalid file name {name!r} in image archive")
    if name.startswith("/") or ".." in name.split("/"):
        raise ImageError(f"image archive refers to unsafe path {name!r}")
    cleaned = posixpath.normpath(name)
    if cleaned in (".", ""):
        raise ImageError(f"invalid file name {name!r} in image archive")
    return cleaned


class Source(Protocol):
    """Read access to the files of an image archive."""

    description: str

    def exists(self, name: str) -> bool: ...

    def open(self, name: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...

    def close(self) -> None: ...


class DirSource:
    """An archive unpacked in a directory (an OCI image layout, a docker save dir)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.description = str(root)

    def _path(self, name: str) -> Path:
        path = (self.root / _clean_name(name)).resolve()
        if path != self.root and self.root not in path.parents:
            raise ImageError(f"image archive path {name!r} leads outside {self.description}")
        return path

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        path = self._path(name)
        if not path.is_file():
            raise ImageError(f"{self.description} has no file {name!r}")
        with open(path, "rb") as f:
            yield f

    def close(self) -> None:
        pass


class TarSource:
    """An archive packed in a tar (``docker save`` output, an OCI archive), maybe gzipped."""

    def __init__(self, path: Path) -> None:
        self.description = str(path)
        try:
            self._tf = tarfile.open(path, "r:*")
            members = self._tf.getmembers()
        except READ_ERRORS as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
            if detail.startswith("file could not be opened successfully"):
                detail = "not a tar, or an unknown compression"
            raise ImageError(f"{path} is not a readable tar archive: {detail}") from exc
        self._members: dict[str, tarfile.TarInfo] = {}
        for m in members:
            name = posixpath.normpath(m.name.lstrip("/"))
            self._members[name] = m

    def _member(self, name: str) -> tarfile.TarInfo | None:
        m = self._members.get(_clean_name(name))
        seen = 0
        while m is not None and m.issym() and seen < 8:
            seen += 1
            target = posixpath.normpath(posixpath.join(posixpath.dirname(m.name), m.linkname))
            if target.startswith("../") or target.startswith("/"):
                raise ImageError(f"image archive member {m.name!r} links outside the archive")
            m = self._members.get(target)
        if m is not None and m.islnk():
            m = self._members.get(posixpath.normpath(m.linkname.lstrip("/")))
        if m is None or not m.isreg():
            return None
        return m

    def exists(self, name: str) -> bool:
        return self._member(name) is not None

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        m = self._member(name)
        if m is None:
            raise ImageError(f"{self.description} has no file {name!r}")
        try:
            f = self._tf.extractfile(m)
        except READ_ERRORS as exc:
            raise ImageError(f"{self.description} is corrupt: {exc}") from exc
        assert f is not None
        with f:
            yield f

    def close(self) -> None:
        self._tf.close()


def open_source(path: Path) -> Source:
    """Open a directory or a tar file for reading image files from it."""
    if path.is_dir():
        return DirSource(path)
    if path.is_file():
        return TarSource(path)
    if not os.path.lexists(path):
        raise ImageError(f"{path} does not exist")
    raise ImageError(f"{path} is neither a directory nor a file")


def read_small(source: Source, name: str, what: str, limit: int = MAX_JSON_BYTES) -> bytes:
    """Read a small file (JSON) whole; refuse anything bigger than ``limit``."""
    try:
        with source.open(name) as f:
            data = f.read(limit + 1)
    except READ_ERRORS as exc:
        raise ImageError(f"{source.description} is corrupt reading {what}: {exc}") from exc
    if len(data) > limit:
        raise ImageError(f"{what} in {source.description} is too large")
    return data


# --- planning an import: what to copy, from where ----------------------------------


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


@dataclass
class LayerPlan:
    name: str  #: file name inside the source
    digest: str | None  #: expected blob digest, when the format says it
    size: int | None
    media_type: str | None  #: None: sniff from the content (docker save)


@dataclass
class ImportPlan:
    config_bytes: bytes
    config_digest: str
    manifest_bytes: bytes | None
    manifest_digest: str | None
    layers: list[LayerPlan]
    tags: list[str]




def _read_blob(src: Source, desc: oci.Descriptor, what: str) -> bytes:
    name = f"blobs/sha256/{_hex(desc.digest)}"
    if not src.exists(name):
        raise ImageError(f"{src.description} is missing the {what} blob {desc.digest}")
    if desc.size > 8 << 20:
        raise ImageError(f"{what} {desc.digest} is too large ({desc.size} bytes)")
    data = read_small(src, name, what)
    got = "sha256:" + hashlib.sha256(data).hexdigest()
    if got != desc.digest or len(data) != desc.size:
        raise ImageError(f"{what} blob {desc.digest} does not match its digest or size")
    return data


def _docker_tags(src: Source, config_digest: str) -> list[str] | None:
    """RepoTags from a docker save manifest.json entry whose Config is this config."""
    if not src.exists("manifest.json"):
        return None
    entries = oci.load_json(read_small(src, "manifest.json", "manifest.json"), "manifest.json")
    if not isinstance(entries, list):
        return None
    for e in entries:
        if isinstance(e, dict) and isinstance(e.get("Config"), str):
            if _hex(config_digest) in e["Config"]:
                tags = e.get("RepoTags") or []
                return [t for t in tags if isinstance(t, str)]
    return None


def plan_oci(src: Source) -> ImportPlan:
    layout = oci.load_json(read_small(src, "oci-layout", "oci-layout"), "oci-layout")
    if not isinstance(layout, dict) or layout.get("imageLayoutVersion") != oci.OCI_LAYOUT_VERSION:
        raise ImageError(f"{src.description}: unsupported OCI layout version")
    top = oci.select_manifest(oci.parse_index(read_small(src, "index.json", "index.json")))
    desc = top
    for _ in range(4):  # nested indexes
        if desc.media_type not in oci.INDEX_TYPES:
            break
        desc = oci.select_manifest(oci.parse_index(_read_blob(src, desc, "index"),
                                                   desc.media_type))
    if desc.media_type not in oci.MANIFEST_TYPES:
        raise ImageError(f"unsupported manifest media type {desc.media_type!r}")
    manifest_bytes = _read_blob(src, desc, "manifest")
    manifest = oci.parse_manifest(manifest_bytes, desc.media_type)
    config_bytes = _read_blob(src, manifest.config, "config")
    tags = _docker_tags(src, manifest.config.digest)
    if tags is None:
        name = top.annotation("io.containerd.image.name")
        ref = top.annotation(oci.REF_NAME_ANNOTATION)
        # skopeo and umoci write ref.name as a bare tag ("latest"): with no
        # repository name in it, it is no image name ("latest:latest" would be
        # wrong), so such an image is imported untagged unless --tag is given.
        if not name and ref and (":" in ref or "/" in ref):
            name = ref
        tags = [name] if name else []
    layers = [
        LayerPlan(f"blobs/sha256/{_hex(d.digest)}", d.digest, d.size, d.media_type)
        for d in manifest.layers
    ]
    return ImportPlan(config_bytes, manifest.config.digest, manifest_bytes, desc.digest, layers,
                      tags)


def plan_docker(src: Source, want_tag: str | None) -> ImportPlan:
    entries = oci.load_json(read_small(src, "manifest.json", "manifest.json"), "manifest.json")
    if not isinstance(entries, list) or not entries:
        raise ImageError("docker archive manifest.json holds no image")
    entry: Any = entries[0]
    if len(entries) > 1:
        matching = [e for e in entries if isinstance(e, dict) and want_tag is not None
                    and want_tag in [normalize_tag(t) for t in (e.get("RepoTags") or [])]]
        if len(matching) != 1:
            raise ImageError(f"docker archive holds {len(entries)} images; "
                             "choose one with --tag NAME:TAG")
        entry = matching[0]
    if not isinstance(entry, dict):
        raise ImageError("docker archive manifest.json entry must be an object")
    config_name = entry.get("Config")
    layer_names = entry.get("Layers")
    if not isinstance(config_name, str) or not config_name:
        raise ImageError("docker archive manifest.json has no Config")
    if not isinstance(layer_names, list) or not all(isinstance(n, str) for n in layer_names):
        raise ImageError("docker archive manifest.json has no Layers list")
    if not src.exists(config_name):
        raise ImageError(f"{src.description} is missing its config {config_name!r}")
    config_bytes = read_small(src, config_name, "config")
    config_hex = hashlib.sha256(config_bytes).hexdigest()
    named = re.search(r"[0-9a-f]{64}", config_name)
    if named and named.group(0) != config_hex:
        raise ImageError(f"config {config_name!r} does not match its digest")
    layers = []
    for n in layer_names:
        m = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", n)
        layers.append(LayerPlan(n, f"sha256:{m.group(1)}" if m else None, None, None))
    tags = entry.get("RepoTags") or []
    if not isinstance(tags, list):
        tags = []
    return ImportPlan(config_bytes, f"sha256:{config_hex}", None, None, layers,
                 [t for t in tags if isinstance(t, str)])


def archive_tags(names: Sequence[str]) -> list[str]:
    """Normalised tags from archive metadata; invalid ones are skipped, not fatal."""
    out = []
    for name in names:
        try:
            out.append(normalize_tag(name))
        except ImageError:
            log.warning("ignoring invalid tag %r in image archive", name)
    return out


def sniff_media_type(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return oci.OCI_LAYER_GZIP
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return oci.OCI_LAYER_ZSTD
    return oci.OCI_LAYER_TAR
