"""``ember pull``: an image from a registry into the content store.

1. The reference is normalised (``alpine`` -> ``docker.io/library/alpine:latest``)
   and ``registries.conf`` consulted: a blocked registry is refused, mirrors
   are tried first, then the registry (or the location it is rewritten to).
2. The manifest is fetched; from an index, the entry for the platform asked
   for (the host's, ``linux/amd64``, by default).
3. An image already in the store (same config digest) only gains the tag.
   Otherwise its config is fetched and, up to :data:`PARALLEL` at a time, the
   layers the store does not hold yet (by digest, from any image), each into
   ``downloads/<hex>.part``, where an interrupted download resumes.
4. While later layers still download, each layer is unpacked as soon as it
   and those below it are there, then the EROFS root file system is built,
   all in a private work directory of the pull.
5. The store commits it under its lock (:meth:`ImageStore.add_pulled`):
   blobs renamed into place (no second copy), record, tag. A failed pull
   leaves the store as it was; verified downloads stay for the next try.

Progress goes to ``on_event`` as JSON-ready dicts (the daemon streams them as
NDJSON): ``{"status": "resolved", ...}``, ``{"status": "layer", "id": digest,
"state": "exists"|"waiting"|"downloading"|"downloaded"|"unpacked", "current",
"total"}``, ``{"status": "message", "message": ...}``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.errors import (
    ImageError,
    NoMatchingPlatform,
    RegistryAuthError,
    RegistryError,
    RegistryNotFound,
)
from ember.images import oci
from ember.images.pulled import PulledImage, add_pulled, download_path, pull_workspace
from ember.images.reference import Reference, parse
from ember.images.store import ImageStore, Imported, Layer

#: Blobs downloaded at once.
PARALLEL = 4
#: At most this often a "downloading" event per layer (and always its last).
_EVENT_INTERVAL = 0.1

PullEvents = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Pulled:
    """What a pull did."""

    imported: Imported
    reference: Reference
    digest: str  #: the digest the registry serves for the reference (an index's if one)
    source: str  #: the host it came from (a mirror, the registry)
    fetched: int  #: layers downloaded (not already in the store)
    bytes: int  #: bytes downloaded


@dataclass(frozen=True)
class PlatformChoice:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(x for x in (self.os, self.architecture, self.variant) if x)


def parse_platform(value: str | None) -> PlatformChoice:
    """``os/arch[/variant]``; None: the host's (``linux/amd64``)."""
    if not value:
        return PlatformChoice(oci.PLATFORM_OS, oci.PLATFORM_ARCH)
    parts = value.strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ImageError(f"invalid platform {value!r}: expected OS/ARCH[/VARIANT], "
                         "like linux/amd64 or linux/arm64/v8")
    return PlatformChoice(*parts)


def select_platform(entries: tuple[oci.Descriptor, ...], want: PlatformChoice,
                    what: str) -> oci.Descriptor:
    """The index entry for ``want``; NoMatchingPlatform listing what there is."""
    usable = [e for e in entries if e.media_type in oci.MANIFEST_TYPES | oci.INDEX_TYPES]
    if len(usable) == 1 and usable[0].platform is None:
        return usable[0]
    for e in usable:
        p = e.platform
        if p is None or p.os != want.os or p.architecture != want.architecture:
            continue
        # arm64's variant is v8 when unstated
        variant = p.variant or ("v8" if p.architecture == "arm64" else "")
        if want.variant and want.variant != variant:
            continue
        return e
    found = sorted({"/".join(x for x in (e.platform.os, e.platform.architecture,
                                         e.platform.variant) if x)
                    for e in usable if e.platform is not None
                    and e.platform.os != "unknown"})
    raise NoMatchingPlatform(f"{what} has no image for {want} (it has: "
                             f"{', '.join(found) or 'no platform-tagged images'}); "
                             "choose one with --platform")


@dataclass(frozen=True)
class _Source:
    host: str  #: HOST[:PORT] requests go to
    name: str  #: as users name it (messages, credentials)
    repo: str  #: repository path on that host
    insecure: bool


def _sources(ref: Reference, env: Mapping[str, str] | None) -> list[_Source]:
    from ember.images.registry.config import registry_policy

    policy = registry_policy(ref.domain, ref.path, env=env)
    if policy.blocked:
        raise RegistryError(f"registry {ref.domain} is blocked by registries.conf")
    out = []
    for location, insecure in [*((m.location, m.insecure) for m in policy.mirrors),
                               (policy.location, policy.insecure)]:
        host, _, prefix = location.partition("/")
        repo = f"{prefix}/{ref.path}" if prefix else ref.path
        api = "registry-1.docker.io" if host in ("docker.io", "index.docker.io") else host
        out.append(_Source(api, host, repo, insecure))
    return out


def pull(store: ImageStore, ref: str, *, platform: str | None = None,
         on_event: PullEvents | None = None, ca_cert: Path | None = None,
         env: Mapping[str, str] | None = None, ember_auth: Path | None = None) -> Pulled:
    """Pull ``ref`` into ``store``; see the module doc.

    Raises:
        InvalidReference: ``ref`` is not a reference.
        RegistryNotFound, RegistryAuthError, NoMatchingPlatform, RegistryError:
            the pull failed (one line saying why); the store is as it was.
    """
    reference = parse(ref)
    want = parse_platform(platform)
    emit = on_event or (lambda _e: None)
    sources = _sources(reference, env)
    errors: list[str] = []
    for i, source in enumerate(sources):
        last = i == len(sources) - 1
        try:
            return _pull_from(store, reference, source, want, emit, ca_cert, env, ember_auth)
        except (RegistryAuthError, NoMatchingPlatform, RegistryNotFound):
            if last:
                raise
            errors.append(source.name)
        except RegistryError as exc:
            if last:
                raise
            errors.append(source.name)
            emit({"status": "message", "message": f"mirror {source.name} failed ({exc}); "
                  "trying the next source"})
    raise AssertionError("unreachable")


def _client(source: _Source, reference: Reference, ca_cert: Path | None,
            env: Mapping[str, str] | None, ember_auth: Path | None) -> Any:
    from ember.images.registry.client import RegistryClient
    from ember.images.registry.config import find_credentials, ssl_context

    loopback = _is_loopback(source.name)
    ctx = ssl_context(source.name, ca_cert=ca_cert, insecure=source.insecure and not loopback)

    def creds(repo: str) -> Any:
        return find_credentials(source.name, repo, env=env, ember_auth=ember_auth)

    return RegistryClient(source.host, name=source.name, ssl_context=ctx,
                          plain_http_ok=loopback or source.insecure, credentials=creds)


def _is_loopback(host: str) -> bool:
    from ember.images.reference import parse as parse_ref

    with contextlib.suppress(ImageError):
        return parse_ref(f"{host}/x").is_loopback
    return False


def _pull_from(store: ImageStore, reference: Reference, source: _Source, want: PlatformChoice,
               emit: PullEvents, ca_cert: Path | None, env: Mapping[str, str] | None,
               ember_auth: Path | None) -> Pulled:
    with _client(source, reference, ca_cert, env, ember_auth) as client:
        data, media_type, top_digest = client.manifest(source.repo, reference.target)
        manifest_digest = top_digest
        if media_type in oci.INDEX_TYPES:
            entry = select_platform(oci.parse_index(data, media_type), want, reference.familiar)
            data, media_type, manifest_digest = client.manifest(source.repo, entry.digest)
            if media_type in oci.INDEX_TYPES:
                raise RegistryError(f"{reference.familiar}: an index inside an index is not "
                                    "supported")
        manifest = oci.parse_manifest(data, media_type)
        image_id = manifest.config.digest
        total = sum(d.size for d in manifest.layers)
        emit({"status": "resolved", "reference": str(reference), "digest": top_digest,
              "id": image_id, "layers": len(manifest.layers), "size": total,
              "source": source.name})
        pulled_as = str(reference)
        repo_digest = f"{reference.name}@{top_digest}"
        tag = reference.familiar if reference.tag is not None else None
        if tag is not None and "@" in tag:
            tag = tag.split("@", 1)[0]
        if tag is not None:
            tag = oci.normalize_tag(tag)
        if store.has_image(image_id):
            for d in manifest.layers:
                emit({"status": "layer", "id": d.digest, "state": "exists", "current": d.size,
                      "total": d.size})
            imported = add_pulled(store, PulledImage(
                image_id, b"", manifest_digest, data, (), {}, Path(), tag, repo_digest,
                pulled_as))
            return Pulled(imported, reference, top_digest, source.name, 0, 0)
        config_bytes = client.small_blob(source.repo, manifest.config)
        info = oci.parse_config(config_bytes)
        if len(info.diff_ids) != len(manifest.layers):
            raise RegistryError(f"{reference.familiar}: its config lists {len(info.diff_ids)} "
                                f"layers but its manifest {len(manifest.layers)}")
        return _fetch_and_build(store, client, reference, source, manifest, manifest_digest,
                                data, config_bytes, info, emit, tag, repo_digest, pulled_as,
                                top_digest)


def _fetch_and_build(store: ImageStore, client: Any, reference: Reference, source: _Source,
                     manifest: oci.Manifest, manifest_digest: str, manifest_bytes: bytes,
                     config_bytes: bytes, info: oci.ConfigInfo, emit: PullEvents,
                     tag: str | None, repo_digest: str, pulled_as: str,
                     top_digest: str) -> Pulled:
    from ember.images.rootfs import build_rootfs

    cancelled = threading.Event()
    counted = {"bytes": 0}
    count_lock = threading.Lock()

    def download(desc: oci.Descriptor) -> Path:
        part = download_path(store, desc.digest)
        done = {"n": 0, "at": 0.0}

        def on_bytes(n: int) -> None:
            if cancelled.is_set():
                raise _Cancelled
            done["n"] += n
            with count_lock:
                counted["bytes"] += n
            now = time.monotonic()
            if now - done["at"] >= _EVENT_INTERVAL or done["n"] == desc.size:
                done["at"] = now
                emit({"status": "layer", "id": desc.digest, "state": "downloading",
                      "current": done["n"], "total": desc.size})

        client.fetch_blob(source.repo, desc, part, on_bytes)
        emit({"status": "layer", "id": desc.digest, "state": "downloaded",
              "current": desc.size, "total": desc.size})
        return part

    layers = [Layer(d.digest, d.media_type, d.size, diff_id, 0)
              for d, diff_id in zip(manifest.layers, info.diff_ids, strict=True)]
    sizes = [0] * len(layers)
    files: dict[str, Path] = {}
    with pull_workspace(store) as ws, \
            concurrent.futures.ThreadPoolExecutor(PARALLEL, "ember-pull") as pool:
        futures: dict[str, concurrent.futures.Future[Path]] = {}
        for d in manifest.layers:
            if d.digest in futures:
                continue
            if store.has_blob(d.digest):
                emit({"status": "layer", "id": d.digest, "state": "exists",
                      "current": d.size, "total": d.size})
                continue
            emit({"status": "layer", "id": d.digest, "state": "waiting", "current": 0,
                  "total": d.size})
            futures[d.digest] = pool.submit(download, d)

        def source_of(digest: str) -> Path | Callable[[], Path]:
            fut = futures.get(digest)
            if fut is None:
                return store.blob_path(digest)

            def wait() -> Path:
                path = fut.result()
                files[digest] = path
                return path
            return wait

        def on_layer(i: int, scan: Any) -> None:
            sizes[i] = scan.size
            if scan.skipped:
                from ember.images.unpack import skipped_message

                emit({"status": "message",
                      "message": skipped_message(scan, layers[i].digest[:19] + "…")})
            emit({"status": "layer", "id": layers[i].digest, "state": "unpacked",
                  "current": layers[i].size, "total": layers[i].size})

        try:
            rootfs = build_rootfs([(source_of(x.digest), x) for x in layers],
                                  ws / f"{manifest.config.digest.removeprefix('sha256:')}.erofs",
                                  scratch=ws,
                                  say=lambda m: emit({"status": "message", "message": m}),
                                  on_layer=on_layer)
        except BaseException:
            cancelled.set()
            for fut in futures.values():
                fut.cancel()
            raise
        for digest, fut in futures.items():
            files[digest] = fut.result()
        pulled = PulledImage(
            manifest.config.digest, config_bytes, manifest_digest, manifest_bytes,
            tuple(Layer(x.digest, x.media_type, x.size, x.diff_id, s)
                  for x, s in zip(layers, sizes, strict=True)),
            files, rootfs, tag, repo_digest, pulled_as)
        imported = add_pulled(store, pulled)
    return Pulled(imported, reference, top_digest, source.name, len(futures), counted["bytes"])


def describe(event: Mapping[str, Any]) -> str | None:
    """A pull event as one progress line (None: not worth a line of its own)."""
    from ember.images.rootfs import human_size

    status = event.get("status")
    if status == "resolved":
        return (f"pulling {event.get('reference')} ({event.get('layers')} layers, "
                f"{human_size(int(event.get('size') or 0))}) from {event.get('source')}")
    if status == "message":
        return str(event.get("message"))
    if status == "layer" and event.get("state") in ("exists", "downloaded"):
        short = str(event.get("id", "")).split(":", 1)[-1][:12]
        if event.get("state") == "exists":
            return f"layer {short}: already in the store"
        return f"layer {short}: downloaded {human_size(int(event.get('total') or 0))}"
    return None


class _Cancelled(Exception):
    """Another layer failed: this download stops."""
