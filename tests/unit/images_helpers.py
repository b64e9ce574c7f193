"""Build OCI images by hand, for tests: layer tars, OCI layouts, docker save archives.

Everything here is deterministic (fixed mtimes, sorted JSON) so the same
arguments give the same digests. Typical use::

    from images_helpers import busybox_layer_entries, write_oci_layout, file

    layout = write_oci_layout(tmp_path / "img",
                              [busybox_layer_entries(), [file("etc/motd", b"hi\\n")]],
                              {"Cmd": ["/bin/sh"]}, ref_name="demo:1")
    image = ImageStore(tmp_path / "store").import_path(layout)

or simply ``write_busybox_layout(tmp_path / "bb")`` for a runnable image.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: mtime given to every entry unless told otherwise (2020-09-13).
DEFAULT_MTIME = 1_600_000_000

BUSYBOX = Path("/bin/busybox")

#: Applets linked to busybox in :func:`busybox_layer_entries`, all under bin/.
BUSYBOX_APPLETS = (
    "sh", "echo", "cat", "true", "false", "id", "env", "pwd", "sleep", "ls", "wc",
    "head", "sha256sum", "kill", "whoami", "hostname",
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


# --- layer entries -------------------------------------------------------------


@dataclass(frozen=True)
class TarEntrySpec:
    """One tar entry. Use the constructors below rather than building these directly.

    ``kind`` is one of file, dir, symlink, hardlink, fifo, char, block.
    ``mode`` None means the usual default for the kind.
    """

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    linkname: str = ""
    mtime: int = DEFAULT_MTIME
    xattrs: tuple[tuple[str, str], ...] = field(default=())
    devmajor: int = 0
    devminor: int = 0


def file(name: str, data: bytes = b"", *, mode: int = 0o644, uid: int = 0, gid: int = 0,
         mtime: int = DEFAULT_MTIME, xattrs: Mapping[str, str] | None = None) -> TarEntrySpec:
    """A regular file; ``xattrs`` become PAX ``SCHILY.xattr.*`` records."""
    return TarEntrySpec(name, "file", data, mode, uid, gid, mtime=mtime,
                        xattrs=tuple(sorted((xattrs or {}).items())))


def directory(name: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0,
              mtime: int = DEFAULT_MTIME) -> TarEntrySpec:
    return TarEntrySpec(name, "dir", mode=mode, uid=uid, gid=gid, mtime=mtime)


def symlink(name: str, target: str, *, uid: int = 0, gid: int = 0) -> TarEntrySpec:
    return TarEntrySpec(name, "symlink", mode=0o777, uid=uid, gid=gid, linkname=target)


def hardlink(name: str, target: str) -> TarEntrySpec:
    """A hard link to ``target``, a name (relative to the image root) from this or a lower layer."""
    return TarEntrySpec(name, "hardlink", linkname=target)


def fifo(name: str, *, mode: int = 0o644) -> TarEntrySpec:
    return TarEntrySpec(name, "fifo", mode=mode)


def device(name: str, kind: str = "char", major: int = 1, minor: int = 3) -> TarEntrySpec:
    """A device node (``kind`` char or block); Ember must refuse these."""
    return TarEntrySpec(name, kind, mode=0o666, devmajor=major, devminor=minor)


def whiteout(path: str) -> TarEntrySpec:
    """The whiteout deleting ``path`` from lower layers (``dir/.wh.name``)."""
    head, _, base = path.rstrip("/").rpartition("/")
    return file(f"{head}/.wh.{base}" if head else f".wh.{base}")


def opaque(dirpath: str) -> TarEntrySpec:
    """The opaque whiteout hiding everything lower layers put in ``dirpath``."""
    return file(f"{dirpath.rstrip('/')}/.wh..wh..opq")


_TYPES = {
    "file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE, "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
}
_DEFAULT_MODES = {"dir": 0o755, "symlink": 0o777}


def layer_tar(entries: Sequence[TarEntrySpec]) -> bytes:
    """An uncompressed PAX tar holding ``entries`` in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            info = tarfile.TarInfo(e.name)
            info.type = _TYPES[e.kind]
            info.mode = e.mode if e.mode is not None else _DEFAULT_MODES.get(e.kind, 0o644)
            info.uid, info.gid = e.uid, e.gid
            info.uname = info.gname = ""
            info.mtime = e.mtime
            info.linkname = e.linkname
            info.devmajor, info.devminor = e.devmajor, e.devminor
            if e.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs}
            if e.kind == "file":
                info.size = len(e.data)
                tf.addfile(info, io.BytesIO(e.data))
            else:
                tf.addfile(info)
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """Deterministic gzip (no name, mtime 0)."""
    return gzip.compress(data, mtime=0)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def image_config(config: Mapping[str, Any] | None, diff_ids: Sequence[str]) -> dict[str, Any]:
    """A full OCI image config document around a ``config`` section (Env, Cmd, ...)."""
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": dict(config) if config is not None else {},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "ember tests"}
                    for _ in diff_ids],
    }


# --- OCI layouts -----------------------------------------------------------------------


def _write_blob(blobs: Path, data: bytes) -> str:
    digest = sha256_digest(data)
    (blobs / digest.split(":", 1)[1]).write_bytes(data)
    return digest


def write_oci_layout(
    dest: Path,
    layers: Sequence[Sequence[TarEntrySpec] | bytes],
    config: Mapping[str, Any] | None = None,
    *,
    ref_name: str | None = None,
    compression: str = "gzip",
    layer_media_types: Sequence[str] | None = None,
    full_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write an OCI image layout (``oci-layout``, ``index.json``, ``blobs/``) at ``dest``.

    Args:
        dest: the directory to create (may exist).
        layers: lowest first; each a list of entries, or ready-made uncompressed tar bytes.
        config: the image config's ``config`` section (Env, Entrypoint, Cmd, WorkingDir,
            User, Labels...).
        ref_name: the ``org.opencontainers.image.ref.name`` annotation (a tag), if any.
        compression: ``"gzip"`` or ``"none"`` for the layer blobs.
        layer_media_types: override each layer's media type (to test rejection).
        full_config: use this whole config document instead (diff_ids not computed).

    Returns:
        ``dest``. :func:`layout_image_id` gives the resulting image id.
    """
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    descs, diff_ids = [], []
    for i, layer in enumerate(layers):
        tar = layer if isinstance(layer, bytes) else layer_tar(layer)
        diff_ids.append(sha256_digest(tar))
        blob = gzip_bytes(tar) if compression == "gzip" else tar
        media_type = LAYER_GZIP if compression == "gzip" else LAYER_TAR
        if layer_media_types is not None:
            media_type = layer_media_types[i]
        descs.append({"mediaType": media_type, "digest": _write_blob(blobs, blob),
                      "size": len(blob)})
    cfg = _dumps(full_config if full_config is not None else image_config(config, diff_ids))
    manifest = _dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _write_blob(blobs, cfg),
                   "size": len(cfg)},
        "layers": descs,
    })
    entry: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": _write_blob(blobs, manifest),
                             "size": len(manifest)}
    if ref_name is not None:
        entry["annotations"] = {"org.opencontainers.image.ref.name": ref_name}
    (dest / "oci-layout").write_bytes(_dumps({"imageLayoutVersion": "1.0.0"}))
    (dest / "index.json").write_bytes(_dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                             "manifests": [entry]}))
    return dest


def _layout_doc(layout: Path, digest: str) -> Any:
    return json.loads((layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes())


def layout_manifest(layout: Path) -> dict[str, Any]:
    """The (single) manifest of an OCI layout written by :func:`write_oci_layout`."""
    index = json.loads((layout / "index.json").read_bytes())
    result: dict[str, Any] = _layout_doc(layout, index["manifests"][0]["digest"])
    return result


def layout_image_id(layout: Path) -> str:
    """The image id (config digest) of an OCI layout's single image."""
    return str(layout_manifest(layout)["config"]["digest"])


def layout_blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def tar_directory(src: Path, dest: Path) -> Path:
    """Pack directory ``src`` into tar ``dest`` (an OCI archive from a layout, say)."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=p.relative_to(src).as_posix(), recursive=False)
    return dest


# --- docker save archives --------------------------------------------------------------


def write_docker_archive(
    dest: Path,
    layers: Sequence[Sequence[TarEntrySpec] | bytes],
    config: Mapping[str, Any] | None = None,
    *,
    repo_tags: Sequence[str] | None = ("example:latest",),
) -> Path:
    """Write a legacy ``docker save`` tarball: ``manifest.json``, ``<hex>.json``,
    ``<id>/layer.tar`` (uncompressed), ``repositories``. Returns ``dest``."""
    tars = [layer if isinstance(layer, bytes) else layer_tar(layer) for layer in layers]
    diff_ids = [sha256_digest(t) for t in tars]
    cfg = _dumps(image_config(config, diff_ids))
    cfg_hex = hashlib.sha256(cfg).hexdigest()
    files: list[tuple[str, bytes]] = [(f"{cfg_hex}.json", cfg)]
    layer_names = []
    chain = ""
    for tar in tars:
        chain = hashlib.sha256((chain + sha256_digest(tar)).encode()).hexdigest()
        layer_names.append(f"{chain}/layer.tar")
        files.append((f"{chain}/VERSION", b"1.0"))
        files.append((f"{chain}/layer.tar", tar))
    manifest = [{"Config": f"{cfg_hex}.json", "RepoTags": list(repo_tags) if repo_tags else None,
                 "Layers": layer_names}]
    files.append(("manifest.json", _dumps(manifest)))
    files.append(("repositories", b"{}"))
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = DEFAULT_MTIME
            tf.addfile(info, io.BytesIO(data))
    return dest


def docker_archive_image_id(archive: Path) -> str:
    with tarfile.open(archive) as tf:
        f = tf.extractfile("manifest.json")
        assert f is not None
        return "sha256:" + str(json.loads(f.read())[0]["Config"]).split(".")[0]


# --- busybox ---------------------------------------------------------------------------

PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n"


def busybox_layer_entries(busybox: Path = BUSYBOX) -> list[TarEntrySpec]:
    """One layer making a minimal runnable system from a static busybox.

    bin/busybox plus ``bin/<applet>`` symlinks to it (:data:`BUSYBOX_APPLETS`),
    etc/passwd and etc/group with root (0) and ``app`` (uid/gid 1000), /root,
    /home/app owned by app, and /tmp (1777).
    """
    entries = [
        directory("bin"),
        file("bin/busybox", busybox.read_bytes(), mode=0o755),
        *(symlink(f"bin/{a}", "busybox") for a in BUSYBOX_APPLETS),
        directory("etc"),
        file("etc/passwd", PASSWD.encode()),
        file("etc/group", GROUP.encode()),
        file("etc/hostname", b"ember\n"),
        directory("root", mode=0o700),
        directory("home"),
        directory("home/app", uid=1000, gid=1000),
        directory("tmp", mode=0o1777),
    ]
    return entries


BUSYBOX_CONFIG: Mapping[str, Any] = {
    "Env": ["PATH=/bin"],
    "Cmd": ["/bin/sh"],
    "WorkingDir": "/",
}


def write_busybox_layout(
    dest: Path,
    *,
    config: Mapping[str, Any] | None = None,
    ref_name: str | None = "busybox:latest",
    extra_layers: Sequence[Sequence[TarEntrySpec]] = (),
) -> Path:
    """An OCI layout of a busybox image (plus ``extra_layers`` on top), ready to import."""
    return write_oci_layout(
        dest,
        [busybox_layer_entries(), *extra_layers],
        dict(config) if config is not None else dict(BUSYBOX_CONFIG),
        ref_name=ref_name,
    )
