"""The live-figures routes: a machine's host usage, every running machine's, the guest's
processes. Registered by ``api/app.py``'s ``create_app``; see ``daemon/stats.py``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Query

from ember.api import models
from ember.daemon.manager import Manager
from ember.daemon.states import ACTIVE

Call = Callable[..., Awaitable[Any]]


def add_stats_routes(app: FastAPI, mgr: Manager, call: Call) -> None:
    from ember.daemon.stats import changes_of, stats_of, top_of

    @app.get("/v1/stats", response_model=list[models.MachineStats], tags=["machines"])
    async def all_stats(all: bool = Query(False, description="Also machines without a "
                                                              "QEMU (all zeros)")
                        ) -> list[models.MachineStats]:
        """The host usage of every running (or starting, paused, stopping) machine."""
        chosen = [mm for mm in mgr.all() if all or mm.state in ACTIVE]
        docs = await call(lambda: [stats_of(mm) for mm in chosen])
        return [models.MachineStats.model_validate(d) for d in docs]

    @app.get("/v1/machines/{name}/stats", response_model=models.MachineStats,
             tags=["machines"])
    async def machine_stats(name: str) -> models.MachineStats:
        """CPU seconds, memory used and given, host storage I/O of one machine, now."""
        mm = mgr.get(name)
        return models.MachineStats.model_validate(await call(stats_of, mm))

    @app.get("/v1/machines/{name}/top", response_model=models.GuestProcesses,
             tags=["machines"])
    async def machine_top(name: str) -> models.GuestProcesses:
        """The guest's processes (busybox `ps` run in the guest; 409 unless running)."""
        mm = mgr.get(name)
        return models.GuestProcesses.model_validate(await call(top_of, mm))

    @app.get("/v1/machines/{name}/changes", response_model=list[models.Change],
             tags=["machines"])
    async def machine_changes(name: str) -> list[models.Change]:
        """What the machine added (A), changed (C) and deleted (D) in its root since it was
        made from its image, by path (`ember diff`; 409 unless running)."""
        mm = mgr.get(name)
        return [models.Change.model_validate(c) for c in await call(changes_of, mm)]
