"""The daemon's Prometheus metrics (``GET /metrics``, ``api/metrics.py``).

Instruments the daemon updates as things happen (start, exec and API
latencies, request counts), and a collector that reads each machine's figures
at scrape time (state, CPU seconds, memory, storage I/O, restarts: from its
QEMU's cgroup and /proc, ``host/usage.py``), plus the image store and snapshot
cache sizes. Labels stay bounded: a machine's name and id, a state, a route
template, a method, a status code; never a command line.

Network bytes are the guest's own counters (its ``/proc/net/dev`` but lo, read
with the tool, ``daemon/stats.py``): slirp keeps none that QEMU reports. Denied
connections are the egress watcher's last reading (``daemon/egress.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ember.daemon.states import STATES

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ember.daemon.manager import Manager

#: Seconds: from a fraction of a warm start to a slow software-CPU boot.
START_BUCKETS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    """The registry ``/metrics`` serves, with the daemon's instruments."""

    def __init__(self, mgr: Manager) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.start_seconds = Histogram(
            "ember_machine_start_seconds", "Time from starting a machine to its agent's READY",
            ["how"], buckets=START_BUCKETS, registry=self.registry)
        self.exec_seconds = Histogram(
            "ember_exec_start_seconds", "Time to start a process in a running machine",
            buckets=FAST_BUCKETS, registry=self.registry)
        self.requests = Counter(
            "ember_api_requests", "API requests answered, by route template and status",
            ["method", "route", "status"], registry=self.registry)
        self.request_seconds = Histogram(
            "ember_api_request_seconds", "Time to answer an API request (to its first byte)",
            ["method", "route"], buckets=FAST_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(mgr))


def _size(root: Path) -> int:
    """Bytes on disk under ``root`` (allocated blocks: sparse files count what they hold)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


class _Collector(Collector):
    def __init__(self, mgr: Manager) -> None:
        self.mgr = mgr

    def describe(self) -> list[Metric]:
        return []  # read at scrape time only (describe() would run a collection)

    def collect(self) -> Iterator[Metric]:
        from ember import paths
        from ember.daemon.stats import network_of
        from ember.host.usage import qemu_usage

        labels = ["name", "id"]
        state = GaugeMetricFamily("ember_machine_state", "1 for the state the machine is in",
                                  labels=[*labels, "state"])
        cpu = CounterMetricFamily("ember_machine_cpu_seconds",
                                  "CPU time of the machine's QEMU (cgroup, else /proc)",
                                  labels=labels)
        mem = GaugeMetricFamily("ember_machine_memory_bytes",
                                "Host memory the machine uses (cgroup memory.current, else "
                                "QEMU's resident set)", labels=labels)
        limit = GaugeMetricFamily("ember_machine_memory_limit_bytes",
                                  "Guest memory the machine was given", labels=labels)
        rd = CounterMetricFamily("ember_machine_storage_read_bytes",
                                 "Bytes QEMU read from host storage", labels=labels)
        wr = CounterMetricFamily("ember_machine_storage_write_bytes",
                                 "Bytes QEMU wrote to host storage", labels=labels)
        net_rx = CounterMetricFamily("ember_machine_network_receive_bytes",
                                     "Bytes the guest's interfaces (not lo) received, as it "
                                     "counts them", labels=labels)
        net_tx = CounterMetricFamily("ember_machine_network_transmit_bytes",
                                     "Bytes the guest's interfaces (not lo) sent",
                                     labels=labels)
        restarts = CounterMetricFamily("ember_machine_restarts",
                                       "Restarts by the machine's restart policy",
                                       labels=labels)
        denied = CounterMetricFamily("ember_machine_egress_denied",
                                     "New connections the machine's firewall dropped in "
                                     "this boot (its egress policy and the default rules; "
                                     "tap network), as last read (every 5 s)", labels=labels)
        counts = dict.fromkeys(STATES, 0)
        for mm in self.mgr.all():
            doc = mm.public()
            key = [str(doc.get("name")), str(doc.get("id"))]
            st = str(doc.get("state"))
            counts[st] = counts.get(st, 0) + 1
            state.add_metric([*key, st], 1)
            limit.add_metric(key, int(doc.get("memory_mib") or 0) << 20)
            restarts.add_metric(key, int(doc.get("restart_count") or 0))
            dropped = mm.egress_denied()  # the egress watcher's reading: no process here
            if dropped is not None:
                denied.add_metric(key, dropped)
            m = mm.machine
            vm = m.vm if m is not None else None
            if vm is None or st not in ("running", "paused", "starting", "stopping"):
                continue
            cg = vm.cgroup.paths if vm.cgroup is not None else ()
            usage = qemu_usage(vm.pid, cg)
            if usage is None:
                continue
            cpu.add_metric(key, usage.cpu_seconds)
            mem.add_metric(key, usage.memory_bytes)
            rd.add_metric(key, usage.read_bytes)
            wr.add_metric(key, usage.write_bytes)
            if st == "running":
                net = network_of(mm)
                if net is not None:
                    net_rx.add_metric(key, net[0])
                    net_tx.add_metric(key, net[1])
        yield from (state, cpu, mem, limit, rd, wr, net_rx, net_tx, restarts, denied)
        machines = GaugeMetricFamily("ember_machines", "Machines by state", labels=["state"])
        for st, n in sorted(counts.items()):
            machines.add_metric([st], n)
        yield machines
        store = GaugeMetricFamily("ember_image_store_bytes",
                                  "Disk used by the image store (blobs, root file systems)")
        store.add_metric([], _size(self.mgr.store.root))
        yield store
        images = GaugeMetricFamily("ember_images", "Images in the store")
        images.add_metric([], len(self.mgr.store.list()))
        yield images
        snaps = GaugeMetricFamily("ember_snapshot_bytes", "Disk used by snapshots",
                                  labels=["kind"])
        snaps.add_metric(["boot"], _size(paths.boot_snapshots_dir()))
        snaps.add_metric(["user"], _size(paths.snapshots_dir()))
        yield snaps
