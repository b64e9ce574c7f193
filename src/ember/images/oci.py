"""OCI and Docker image formats: descriptors, manifests, indexes and configs.

Only this package knows OCI. Everything here is pure parsing and merging; no
file system access. Untrusted JSON is checked field by field and any surprise
raises :class:`~ember.errors.ImageError` with a one-line message.

The run-time part is :func:`resolve_process`, which merges an image's config
with what the user asked for, following Docker's rules.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ember.errors import ImageError

# --- media types -------------------------------------------------------------

OCI_LAYOUT_VERSION = "1.0.0"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

#: Layer media type -> compression name understood by :mod:`ember.images.unpack`.
_LAYER_COMPRESSION = {
    OCI_LAYER_TAR: "none",
    OCI_LAYER_GZIP: "gzip",
    DOCKER_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
}

#: Annotation carrying a tag in an OCI layout's index.json.
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

#: The platform Ember runs guests on.
PLATFORM_OS = "linux"
PLATFORM_ARCH = "amd64"

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$")


def zstd_available() -> bool:
    """Whether zstd layers can be decompressed here (``zstandard`` module or ``zstd`` tool)."""
    try:
        import zstandard  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        return shutil.which("zstd") is not None
    return True


def layer_compression(media_type: str) -> str:
    """Map a layer media type to ``"none"``, ``"gzip"`` or ``"zstd"``.

    Raises:
        ImageError: the media type is not a layer type Ember can apply.
    """
    comp = _LAYER_COMPRESSION.get(media_type)
    if comp is None:
        raise ImageError(f"unsupported layer media type {media_type!r}")
    if comp == "zstd" and not zstd_available():
        raise ImageError(f"unsupported layer media type {media_type!r} (no zstd decompressor)")
    return comp


def check_digest(value: object, what: str = "digest") -> str:
    """Return ``value`` if it is a ``sha256:<64 hex>`` digest, else raise ImageError."""
    if not isinstance(value, str) or not _DIGEST_RE.match(value):
        if isinstance(value, str) and ":" in value and not value.startswith("sha256:"):
            raise ImageError(f"unsupported digest algorithm in {what} {value[:40]!r}")
        raise ImageError(f"invalid {what} {str(value)[:80]!r}")
    return value


# --- JSON helpers ------------------------------------------------------------


def load_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{what} is not valid JSON: {exc}") from exc


def _obj(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ImageError(f"{what} must be a JSON object")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ImageError(f"{what}.{key} must be a string")
    return value


def _opt_str_list(obj: Mapping[str, Any], key: str, what: str) -> tuple[str, ...] | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"{what}.{key} must be a list of strings")
    return tuple(value)


def _opt_str_map(obj: Mapping[str, Any], key: str, what: str) -> dict[str, str]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ImageError(f"{what}.{key} must be an object of strings")
    return dict(value)


# --- descriptors, manifests, indexes ------------------------------------------


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a blob is, its digest and size."""

    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()
    platform: Platform | None = None

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)

    @classmethod
    def from_json(cls, obj: object, what: str = "descriptor") -> Descriptor:
        d = _obj(obj, what)
        media_type = d.get("mediaType")
        if not isinstance(media_type, str) or not media_type:
            raise ImageError(f"{what} has no mediaType")
        digest = check_digest(d.get("digest"), f"{what} digest")
        size = d.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"{what} {digest[:19]} has an invalid size")
        annotations = _opt_str_map(d, "annotations", what)
        platform = None
        if d.get("platform") is not None:
            p = _obj(d["platform"], f"{what}.platform")
            platform = Platform(
                os=_opt_str(p, "os", f"{what}.platform"),
                architecture=_opt_str(p, "architecture", f"{what}.platform"),
                variant=_opt_str(p, "variant", f"{what}.platform"),
            )
        return cls(media_type, digest, size, tuple(sorted(annotations.items())), platform)


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI v1 or Docker v2 schema 2)."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


def _check_schema(doc: Mapping[str, Any], what: str) -> None:
    if doc.get("schemaVersion") != 2:
        raise ImageError(f"{what} has unsupported schemaVersion {doc.get('schemaVersion')!r}")


def document_media_type(data: bytes, fallback: str = "") -> str:
    """The media type a manifest/index document declares, else ``fallback``, else a guess."""
    doc = _obj(load_json(data, "manifest"), "manifest")
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if fallback:
        return fallback
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc:
        return OCI_MANIFEST
    return ""


def parse_manifest(data: bytes, media_type: str = "") -> Manifest:
    """Parse an image manifest; ``media_type`` is the descriptor's, used if the body omits it."""
    doc = _obj(load_json(data, "manifest"), "manifest")
    declared = doc.get("mediaType") or media_type or OCI_MANIFEST
    if declared not in MANIFEST_TYPES:
        raise ImageError(f"unsupported manifest media type {declared!r}")
    _check_schema(doc, "manifest")
    config = Descriptor.from_json(doc.get("config"), "manifest config")
    if config.media_type not in CONFIG_TYPES:
        raise ImageError(f"unsupported image config media type {config.media_type!r}")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageError("manifest has no layers list")
    layers = tuple(Descriptor.from_json(x, f"layer {i + 1}") for i, x in enumerate(raw_layers))
    for layer in layers:
        layer_compression(layer.media_type)
    return Manifest(str(declared), config, layers)


def parse_index(data: bytes, media_type: str = "") -> tuple[Descriptor, ...]:
    """Parse an image index / manifest list; return its entries."""
    doc = _obj(load_json(data, "index"), "index")
    declared = doc.get("mediaType") or media_type or OCI_INDEX
    if declared not in INDEX_TYPES:
        raise ImageError(f"unsupported index media type {declared!r}")
    _check_schema(doc, "index")
    raw = doc.get("manifests")
    if not isinstance(raw, list):
        raise ImageError("index has no manifests list")
    return tuple(Descriptor.from_json(x, f"index entry {i + 1}") for i, x in enumerate(raw))


def select_manifest(entries: Sequence[Descriptor]) -> Descriptor:
    """Choose the entry to import from an index: the linux/amd64 one.

    An index with a single entry and no platform is taken as is. Entries with an
    unknown platform (attestations: ``unknown/unknown``) are ignored.

    Raises:
        ImageError: no entry, several candidates, or no linux/amd64 entry.
    """
    usable = [e for e in entries if e.media_type in MANIFEST_TYPES | INDEX_TYPES]
    if not usable:
        kinds = ", ".join(sorted({e.media_type for e in entries})) or "nothing"
        raise ImageError(f"index holds no image manifest (found {kinds})")
    if len(usable) == 1 and usable[0].platform is None:
        return usable[0]
    ours = [
        e for e in usable
        if e.platform is not None
        and e.platform.os == PLATFORM_OS
        and e.platform.architecture == PLATFORM_ARCH
    ]
    if len(ours) >= 1:
        return ours[0]
    if all(e.platform is None for e in usable):
        raise ImageError(f"index holds {len(usable)} images; import a layout with one image")
    found = ", ".join(
        sorted({f"{e.platform.os}/{e.platform.architecture}" for e in usable if e.platform})
    )
    raise ImageError(f"image has no {PLATFORM_OS}/{PLATFORM_ARCH} variant (found {found})")


# --- image config --------------------------------------------------------------


#: Top-level keys of an image config document (as opposed to its ``config`` section).
_DOCUMENT_KEYS = frozenset({"config", "rootfs", "architecture", "os", "created", "history",
                            "author", "variant", "os.version", "os.features"})


@dataclass(frozen=True)
class ImageConfig:
    """The run-time part (``config`` section) of an OCI image configuration."""

    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    working_dir: str = ""
    user: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    exposed_ports: tuple[str, ...] = ()
    stop_signal: str = ""

    @property
    def labels_dict(self) -> dict[str, str]:
        return dict(self.labels)

    @classmethod
    def from_json(cls, obj: object) -> ImageConfig:
        """Build from an image config document (using its ``config`` section), or
        from the ``config`` section itself (``{"Cmd": [...], ...}``).

        A missing or null ``config`` section gives the defaults.
        """
        doc = _obj(obj, "image config")
        if _DOCUMENT_KEYS.isdisjoint(doc) and doc:
            doc = {"config": doc}  # given the section itself
        section = doc.get("config")
        if section is None:
            return cls()
        c = _obj(section, "image config.config")
        what = "config"
        ports = c.get("ExposedPorts")
        if ports is None:
            exposed: tuple[str, ...] = ()
        elif isinstance(ports, dict):
            exposed = tuple(sorted(str(p) for p in ports))
        else:
            raise ImageError("config.ExposedPorts must be an object")
        return cls(
            env=_opt_str_list(c, "Env", what) or (),
            entrypoint=_opt_str_list(c, "Entrypoint", what),
            cmd=_opt_str_list(c, "Cmd", what),
            working_dir=_opt_str(c, "WorkingDir", what),
            user=_opt_str(c, "User", what),
            labels=tuple(sorted(_opt_str_map(c, "Labels", what).items())),
            exposed_ports=exposed,
            stop_signal=_opt_str(c, "StopSignal", what),
        )


@dataclass(frozen=True)
class ConfigInfo:
    """What the store needs from an image config besides :class:`ImageConfig`."""

    config: ImageConfig
    diff_ids: tuple[str, ...]
    created: str
    os: str
    architecture: str


def parse_config(data: bytes) -> ConfigInfo:
    """Parse and check an image config blob.

    Raises:
        ImageError: not JSON, wrong types, no ``rootfs.diff_ids``, or a platform
            other than linux/amd64.
    """
    doc = _obj(load_json(data, "image config"), "image config")
    config = ImageConfig.from_json(doc)
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ImageError("image config has no rootfs of type 'layers'")
    raw_ids = rootfs.get("diff_ids")
    if not isinstance(raw_ids, list):
        raise ImageError("image config has no rootfs.diff_ids list")
    diff_ids = tuple(check_digest(d, "diff_id") for d in raw_ids)
    os_name = _opt_str(doc, "os", "image config")
    arch = _opt_str(doc, "architecture", "image config")
    if (os_name and os_name != PLATFORM_OS) or (arch and arch != PLATFORM_ARCH):
        raise ImageError(
            f"image is for {os_name or '?'}/{arch or '?'}; Ember runs {PLATFORM_OS}/{PLATFORM_ARCH}"
        )
    return ConfigInfo(config, diff_ids, _opt_str(doc, "created", "image config"), os_name, arch)


# --- process resolution ------------------------------------------------------


@dataclass(frozen=True)
class ProcessSpec:
    """The first process of a machine: what to exec, with which env, where, as whom."""

    argv: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    user: str


def _env_key(entry: str) -> str:
    return entry.split("=", 1)[0]


def merge_env(base: Iterable[str], overrides: Iterable[str]) -> tuple[str, ...]:
    """Image env overridden by ``K=V`` entries (same key replaces, in place); PATH defaulted.

    Raises:
        ImageError: an override is not of the form ``K=V`` with a non-empty K.
    """
    merged: dict[str, str] = {}
    for entry in base:
        merged[_env_key(entry)] = entry
    for entry in overrides:
        key, sep, _ = entry.partition("=")
        if not sep or not key:
            raise ImageError(f"environment entry {entry!r} must look like KEY=VALUE")
        merged[key] = entry
    if "PATH" not in merged:
        merged["PATH"] = f"PATH={DEFAULT_PATH}"
    return tuple(merged.values())


def resolve_process(
    config: ImageConfig,
    *,
    command: Sequence[str] | None = None,
    entrypoint: Sequence[str] | None = None,
    env: Sequence[str] = (),
    workdir: str | None = None,
    user: str | None = None,
) -> ProcessSpec:
    """Merge an image config with the user's overrides, with Docker's semantics.

    * argv = Entrypoint + Cmd. A ``command`` replaces Cmd and keeps Entrypoint.
      An ``entrypoint`` replaces Entrypoint and drops the image's Cmd (an empty
      sequence clears the Entrypoint).
    * env: image Env, then ``env`` entries (``K=V``) replacing same keys; PATH
      gets a default if absent.
    * cwd = ``workdir`` (must be absolute), else WorkingDir, else ``/``.
    * user = ``user``, else the image's User, else ``""`` (root).

    Raises:
        ImageError: no command at all, a relative workdir, or a bad env entry.
    """
    if entrypoint is not None:
        ep: tuple[str, ...] = tuple(entrypoint)
        cmd: tuple[str, ...] = tuple(command) if command is not None else ()
    else:
        ep = config.entrypoint or ()
        cmd = tuple(command) if command is not None else (config.cmd or ())
    argv = ep + cmd
    if not argv:
        raise ImageError("image has no command: give one after --")
    if workdir is not None:
        if not workdir.startswith("/"):
            raise ImageError(f"working directory {workdir!r} must be an absolute path")
        cwd = workdir
    else:
        cwd = config.working_dir or "/"
        if not cwd.startswith("/"):
            cwd = "/" + cwd
    return ProcessSpec(
        argv=argv,
        env=merge_env(config.env, env),
        cwd=cwd,
        user=user if user is not None else config.user,
    )


# --- references -----------------------------------------------------------------


def normalize_tag(tag: str) -> str:
    """Check a tag's syntax and give it its canonical form.

    ``name`` -> ``name:latest``; ``docker.io/library/x`` -> ``x:latest``;
    ``localhost:5000/x`` -> ``localhost:5000/x:latest``.

    Raises:
        ImageError: empty, too long, odd characters, ``..`` or ``//``, or
            looks like an image id (``sha256:``).
    """
    t = tag.strip()
    for prefix in ("docker.io/library/", "index.docker.io/library/", "docker.io/",
                   "index.docker.io/"):
        if t.startswith(prefix) and len(t) > len(prefix):
            t = t[len(prefix):]
            break
    if (
        not t
        or len(t) > 255
        or not _TAG_RE.match(t)
        or ".." in t
        or "//" in t
        or t.endswith(("/", ":"))
        or t.startswith("sha256:")
    ):
        raise ImageError(f"invalid image tag {tag!r}")
    name, _, last = t.rpartition("/")
    if ":" not in last:
        t = f"{t}:latest"
    elif not last.split(":", 1)[0] or last.count(":") > 1:
        raise ImageError(f"invalid image tag {tag!r}")
    return t
