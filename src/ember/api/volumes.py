"""The volume routes: create, list, inspect, remove named volumes.

Registered by ``api/app.py``'s ``create_app``; the work is the manager's (its
``VolumeStore``, ``volumes/store.py``), run on worker threads like every blocking
call (a create runs ``mkfs.ext4``; ``in_use`` tries a lock).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Response

from ember.api import models
from ember.daemon.manager import Manager

if TYPE_CHECKING:
    from ember.volumes.store import Volume

Call = Callable[..., Awaitable[Any]]


def volume_model(vol: Volume) -> models.Volume:
    return models.Volume.model_validate(vol.to_json())


def add_volume_routes(app: FastAPI, mgr: Manager, call: Call) -> None:
    @app.post("/v1/volumes", response_model=models.Volume, status_code=201, tags=["volumes"])
    async def create_volume(body: models.VolumeCreate) -> models.Volume:
        """Make a named volume: a sparse image with an empty ext4 (409: the name is taken)."""
        vol = await call(mgr.create_volume, body.name, body.size_bytes)
        result: models.Volume = await call(volume_model, vol)
        return result

    @app.get("/v1/volumes", response_model=list[models.Volume], tags=["volumes"])
    async def list_volumes() -> list[models.Volume]:
        def work() -> list[models.Volume]:
            return [volume_model(v) for v in mgr.volumes()]

        result: list[models.Volume] = await call(work)
        return result

    @app.get("/v1/volumes/{name}", response_model=models.Volume, tags=["volumes"])
    async def get_volume(name: str) -> models.Volume:
        result: models.Volume = await call(lambda: volume_model(mgr.volume(name)))
        return result

    @app.delete("/v1/volumes/{name}", status_code=204, tags=["volumes"])
    async def delete_volume(name: str) -> Response:
        """Delete a volume and its data; 409 while a running machine has it. A stopped
        machine that names it can no longer start (409 at its start)."""
        await call(mgr.remove_volume, name)
        return Response(status_code=204)
