"""Speculative warm starts: QEMU spawned before ``ember run`` has imported the rest of itself.

A warm ``ember run`` spends ~100-150 ms importing Python before it knows which
boot snapshot to start, and the clone's QEMU then needs ~50 ms to come up. So
after a warm start, ``ember run`` keeps a *plan* (``CACHE/run-plans/KEY.json``):
the machine spec it started, keyed by what decides it (the image reference and
the machine options). The next run with the same key spawns QEMU from the plan
at once, from modules that import in a few milliseconds, and has QEMU load
its state on a thread while the rest of Ember imports.

A plan is only a guess. The run then prepares its machine the ordinary way
(image lookup, boot-snapshot checks, the spec) and uses the speculative QEMU
only if its spec is exactly the one the ordinary path built; otherwise it is
killed and its state directory removed, and the run goes on as if there had
been no plan. So a stale plan costs time, never correctness.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember.agent.client import AgentClient
    from ember.agent.protocol import ReadyInfo
    from ember.vmm.process import VMProcess
    from ember.vmm.spec import MachineSpec

PLAN_DIR = "run-plans"
VERSION = 1


def key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"v": VERSION, **fields}, sort_keys=True).encode()
                          ).hexdigest()[:32]


@dataclass
class Speculative:
    """A clone's QEMU started from a plan, loading its state on a thread."""

    vm: VMProcess
    thread: threading.Thread
    error: list[BaseException] = field(default_factory=list)
    #: Once restored: the agent connection, its READY, after the identity refresh.
    agent: AgentClient | None = None
    ready: ReadyInfo | None = None

    def wait_restored(self) -> None:
        """Wait for the state load and the agent's greeting; re-raise what failed."""
        self.thread.join()
        if self.error:
            raise self.error[0]

    def discard(self) -> None:
        """Kill the QEMU and remove its state directory."""
        self.vm.kill()
        self.thread.join(10)
        if self.agent is not None:
            self.agent.close()
        self.vm.close(remove_state=True)


def _path(cache_dir: Path, plan_key: str) -> Path:
    return cache_dir / PLAN_DIR / f"{plan_key}.json"


def spawn(cache_dir: Path, machines_dir: Path, plan_key: str) -> Speculative | None:
    """Start the QEMU of the plan ``plan_key`` under a fresh machine name, if there is a
    plan whose files are all still there; None otherwise (or on any failure)."""
    try:
        plan = json.loads(_path(cache_dir, plan_key).read_text())
        spec_doc = plan["spec"]
        if not all(os.path.exists(p) for p in plan["files"]):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    from ember.errors import EmberError
    from ember.vmm import snapshot
    from ember.vmm.process import VMProcess
    from ember.vmm.spec import MachineSpec

    name = secrets.token_hex(6)
    old = spec_doc["name"]
    spec_doc = {**spec_doc, "name": name,
                "state_dir": str(machines_dir / name),
                "cmdline": spec_doc["cmdline"].replace(f"ember.hostname={old} ",
                                                       f"ember.hostname={name} ")}
    try:
        spec = MachineSpec.from_json(spec_doc)
        if spec.restore is None:
            return None
        vm = VMProcess.start(spec, die_with_parent=True)
    except (EmberError, OSError):
        return None
    spec.path("ephemeral").touch()
    hostname = next((w.partition("=")[2] for w in spec.cmdline.split()
                     if w.startswith("ember.hostname=")), name)
    spec_errors: list[BaseException] = []
    restore = spec.restore

    def load() -> None:
        # all that Machine.start does for a clone once QEMU runs, while Ember imports
        try:
            snapshot.restore(vm)
            from ember.agent.client import AgentClient

            sock = vm.connect(MachineSpec.AGENT_SOCKET, timeout=10.0)
            agent = AgentClient(sock, first_channel=secrets.randbelow(1 << 30) + (1 << 30))
            sp.agent = agent
            sp.ready = agent.hello(timeout=60.0, resend=0.1)
            agent.identity(hostname=hostname, snapshot=restore.snapshot_id,
                           root=spec.root_mounts() if sp.ready.root_pending else None)
        except BaseException as exc:  # reported by wait_restored
            spec_errors.append(exc)

    t = threading.Thread(target=load, name="ember-restore", daemon=True)
    sp = Speculative(vm, t, spec_errors)
    t.start()
    return sp


def save(cache_dir: Path, plan_key: str, spec: MachineSpec) -> None:
    """Keep the plan of a warm start (best effort: a plan is only an optimisation)."""
    assert spec.restore is not None
    doc = {"spec": spec.to_json(),
           "files": [str(p) for p in (spec.kernel, spec.initramfs, *(d.path for d in spec.drives),
                                      spec.restore.memory, spec.restore.state)]}
    path = _path(cache_dir, plan_key)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)


def forget(cache_dir: Path, plan_key: str) -> None:
    with contextlib.suppress(OSError):
        _path(cache_dir, plan_key).unlink()
