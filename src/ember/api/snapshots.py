"""The snapshot routes: take, list, inspect, remove; clone a machine.

Registered by ``api/app.py``'s ``create_app``; the work is the manager's
(``daemon/snapshots.py``), run on worker threads like every blocking call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Response

from ember.api import models
from ember.daemon.managed import Managed
from ember.daemon.manager import Manager

Call = Callable[..., Awaitable[Any]]


def add_snapshot_routes(app: FastAPI, mgr: Manager, call: Call,
                        machine: Callable[[Managed], models.Machine]) -> None:
    @app.post("/v1/machines/{name}/snapshots", response_model=models.Snapshot, status_code=201,
              tags=["snapshots"])
    async def snapshot_machine(name: str, body: models.SnapshotCreate | None = None
                               ) -> models.Snapshot:
        """Snapshot a running or paused machine (memory, devices, its writable layer); it is
        stopped only for the capture and goes on afterwards (a paused one stays paused)."""
        mm = mgr.get(name)
        snap = await call(mgr.take_snapshot, mm, body.tag if body else None)
        result: models.Snapshot = await call(mgr.snapshot_model, snap)
        return result

    @app.post("/v1/machines/{name}/clone", response_model=models.CloneResult, status_code=201,
              tags=["snapshots"])
    async def clone_machine(name: str, body: models.CloneCreate | None = None
                            ) -> models.CloneResult:
        """Snapshot the machine and start `count` clones of it, named NAME-1, NAME-2..."""
        body = body or models.CloneCreate()
        mm = mgr.get(name)
        snap, clones = await call(mgr.clone, mm, body.count, body.tag)
        return models.CloneResult(snapshot=await call(mgr.snapshot_model, snap),
                                  machines=[machine(c) for c in clones])

    @app.get("/v1/snapshots", response_model=list[models.Snapshot], tags=["snapshots"])
    async def list_snapshots(all: bool = False) -> list[models.Snapshot]:
        """User snapshots; with `all`, the boot snapshots of `ember run`'s warm starts too."""
        snaps = await call(mgr.snapshots, all)
        return [await call(mgr.snapshot_model, s) for s in snaps]

    @app.get("/v1/snapshots/{ref}", response_model=models.Snapshot, tags=["snapshots"])
    async def get_snapshot(ref: str) -> models.Snapshot:
        result: models.Snapshot = await call(mgr.snapshot_model, await call(mgr.snapshot, ref))
        return result

    @app.delete("/v1/snapshots/{ref}", status_code=204, tags=["snapshots"])
    async def delete_snapshot(ref: str, force: bool = False) -> Response:
        """Remove a snapshot; 409 while clones of it exist (`force` removes the daemon's
        clones first) or a running clone maps its memory."""
        await call(mgr.remove_snapshot, ref, force)
        return Response(status_code=204)
