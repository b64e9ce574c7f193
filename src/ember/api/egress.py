"""The egress route: ``PATCH /v1/machines/{name}`` (a machine's egress policy).

Registered by ``api/app.py``'s ``create_app``; the work is ``daemon/egress.py``'s,
on a worker thread (applying a policy to a running machine runs ``nft``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI

from ember.api import models
from ember.daemon import egress
from ember.daemon.managed import Managed
from ember.daemon.manager import Manager

Call = Callable[..., Awaitable[Any]]


def add_egress_routes(app: FastAPI, mgr: Manager, call: Call,
                      machine: Callable[[Managed], models.Machine]) -> None:
    @app.patch("/v1/machines/{name}", response_model=models.Machine, tags=["machines"])
    async def update_machine(name: str, body: models.MachineUpdate) -> models.Machine:
        """Change what a machine was created with; the fields given change, the others
        stay. `egress`: the policy is kept for its next starts and, if it is running or
        paused, applied at once (new connections; open ones stay). 422: a malformed
        rule; 409: the machine (network none, slirp) or the daemon (not root) cannot
        enforce a policy, and then nothing changed. Publishes `egress-updated`."""
        mm = mgr.get(name)
        if "egress" in body.model_fields_set:
            await call(egress.set_policy, mm, body.egress)
            if mm.machine is not None and mm.state in egress.LIVE:
                await call(egress.refresh, mm)
        return machine(mm)
