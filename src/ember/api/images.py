"""The image routes: list, import, upload, pull, tag, inspect, remove, prune.

Registered by ``api/app.py``'s ``create_app``; the work is the manager's, run on
worker threads like every blocking call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ember.api import models
from ember.api.limits import spool
from ember.api.ndjson import line as _line
from ember.daemon.errors import Invalid, ManagerError
from ember.daemon.manager import Manager
from ember.errors import RegistryError

if TYPE_CHECKING:
    from ember.images.store import Image, Imported, Removal

Call = Callable[..., Awaitable[Any]]


def image_fields(img: Image, rootfs: Path) -> dict[str, Any]:
    cfg = img.config
    return {
        "id": img.id, "short_id": img.short_id, "tags": list(img.tags), "size": img.size,
        "created": img.created, "layers": len(img.layers),
        "entrypoint": list(cfg.entrypoint) if cfg.entrypoint is not None else None,
        "cmd": list(cfg.cmd) if cfg.cmd is not None else None, "env": list(cfg.env),
        "workdir": cfg.working_dir, "user": cfg.user,
        "exposed_ports": sorted(cfg.exposed_ports), "labels": cfg.labels_dict,
        "stop_signal": cfg.stop_signal, "manifest_digest": img.manifest_digest,
        "layer_details": [models.ImageLayer(digest=x.digest, media_type=x.media_type,
                                            size=x.size, diff_id=x.diff_id)
                          for x in img.layers],
        "imported": img.imported, "rootfs": str(rootfs),
        "repo_digests": list(img.repo_digests), "pulled_as": img.pulled_as,
    }


def removal_model(r: Removal) -> models.ImageRemoval:
    return models.ImageRemoval(untagged=list(r.untagged), deleted=list(r.deleted),
                               space_reclaimed=r.reclaimed)


def registry_status(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and error code of a failed pull."""
    from ember.errors import NoMatchingPlatform, RegistryAuthError, RegistryNotFound

    if isinstance(exc, RegistryNotFound):
        return 404, "not_found"
    if isinstance(exc, RegistryAuthError):
        return 403, "registry_auth"
    if isinstance(exc, NoMatchingPlatform):
        return 400, "no_platform"
    if isinstance(exc, RegistryError):
        # the registry (a dependency of the request) failed: unreachable, TLS,
        # a corrupt or oversized answer
        return 424, "registry_failed"
    if isinstance(exc, ManagerError):
        return exc.status, exc.code
    return 400, "failed"



def add_image_routes(app: FastAPI, mgr: Manager, call: Call) -> None:
    @app.exception_handler(RegistryError)
    async def _registry(_: Request, exc: RegistryError) -> JSONResponse:
        status, code = registry_status(exc)
        message = " ".join(str(exc).split()) or code
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)

    def image_model(img: Image) -> models.Image:
        return models.Image(**image_fields(img, mgr.store.rootfs_path(img)))

    def imported_model(result: Imported) -> models.ImageImported:
        return models.ImageImported(
            **image_fields(result.image, mgr.store.rootfs_path(result.image)),
            moved_tags=[models.TagMove(tag=m.tag, from_image=m.from_id) for m in result.moved])

    @app.post("/v1/machines/{name}/commit", response_model=models.Image, status_code=201,
              tags=["machines"])
    async def commit_machine(name: str, body: models.CommitCreate) -> models.Image:
        """A new image: the machine's image plus what it changed in its root, read out of
        the running guest as a tar (never mounted on the host); 409 unless running."""
        from ember.daemon.commit import commit_machine

        mm = mgr.get(name)
        return image_model(await call(commit_machine, mm, body.tag, body.comment))

    @app.get("/v1/images", response_model=list[models.Image], tags=["images"])
    async def list_images() -> list[models.Image]:
        return [image_model(i) for i in await call(mgr.images)]

    @app.post("/v1/images/import", response_model=models.ImageImported, status_code=201,
              tags=["images"])
    async def import_image(body: models.ImageImport) -> models.ImageImported:
        return imported_model(await call(mgr.import_image, Path(body.path), body.tag))

    @app.post("/v1/images/upload", response_model=models.ImageImported, status_code=201,
              tags=["images"], openapi_extra={"requestBody": {
                  "required": True, "content": {
                      "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
                      "application/octet-stream": {"schema": {"type": "string",
                                                              "format": "binary"}}}}})
    async def upload_image(request: Request,
                           tag: Annotated[str | None, Query(min_length=1, max_length=255)] = None
                           ) -> models.ImageImported:
        fd, name = tempfile.mkstemp(dir=mgr.uploads_dir, prefix="upload-", suffix=".tar")
        try:
            with os.fdopen(fd, "wb") as f:  # BodyLimit stops it past 2 GiB (413)
                size = await spool(request.stream(), lambda data: call(f.write, data))
            if size == 0:
                raise Invalid("the request body is empty: send an image archive")
            return imported_model(await call(mgr.import_image, Path(name), tag))
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)

    @app.post("/v1/images/pull", tags=["images"], response_class=StreamingResponse,
              responses={200: {"description": "One PullEvent per line, the last `done` (with "
                               "the image) or `error`",
                               "content": {"application/x-ndjson": {
                                   "schema": {"$ref": "#/components/schemas/PullEvent"}}}},
                         403: {"model": models.Error, "description": "The registry wants "
                               "credentials or refused them"},
                         424: {"model": models.Error, "description": "The registry failed: "
                               "unreachable, TLS, a corrupt or oversized answer"}})
    async def pull_image(body: models.ImagePull) -> StreamingResponse:
        """Pull an image from its registry, streaming progress as NDJSON. A failure before
        the image is resolved is an error status; after, an `error` line."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def put(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work() -> None:
            try:
                put("done", mgr.pull_image(body.reference, body.platform,
                                           lambda e: put("event", e), body.ca_cert))
            except Exception as exc:
                put("error", exc)

        threading.Thread(target=work, name="ember-pull", daemon=True).start()
        first = await queue.get()
        if first[0] == "error":
            raise first[1]

        async def lines() -> AsyncIterator[bytes]:
            kind, value = first
            while True:
                if kind == "event":
                    yield _line(value)
                elif kind == "done":
                    yield _line({"status": "done",
                                 "image": imported_model(value).model_dump(mode="json")})
                    return
                else:
                    status, _ = registry_status(value)
                    yield _line({"status": "error", "message": " ".join(str(value).split()),
                                 "code": status})
                    return
                kind, value = await queue.get()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/v1/images/prune", response_model=models.ImageRemoval, tags=["images"])
    async def prune_images(all: bool = False) -> models.ImageRemoval:
        return removal_model(await call(mgr.prune_images, all))

    @app.post("/v1/images/{ref:path}/tag", response_model=models.Image, status_code=201,
              tags=["images"])
    async def tag_image(ref: str, body: models.ImageTag) -> models.Image:
        return image_model(await call(mgr.tag_image, ref, body.tag))

    @app.get("/v1/images/{ref:path}", response_model=models.Image, tags=["images"])
    async def get_image(ref: str) -> models.Image:
        return image_model(await call(mgr.image, ref))

    @app.delete("/v1/images/{ref:path}", response_model=models.ImageRemoval, tags=["images"])
    async def delete_image(ref: str, force: bool = False) -> models.ImageRemoval:
        return removal_model(await call(mgr.remove_image, ref, force))
