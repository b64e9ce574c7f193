"""Benchmark: the cost of the VMM's jail, and the tap network against slirp.

Interleaved in one run, ``--runs`` rounds (medians reported), all in this
process through the ``Machine`` API (what ``ember run`` and the daemon use):

* **Jail**: a cold boot (create → agent READY) and the exec round trip of
  ``true`` (median of ``--execs`` per machine), with ``EMBER_JAIL=off`` and
  with the full jail (root), both on slirp so that only the jail differs.
* **Network**: a guest sends ``--mib`` MiB of zeros (``dd | nc``) to a test host
  in a network namespace made here (``203.0.113.10``, routed over a veth pair:
  nothing leaves the machine), which times the bytes from the first to the
  last; then opens ``--conns`` connections one after another (``nc``; the
  guest's process starts are part of it, alike for both). Slirp against the
  default tap network, both jailed.

Needs root (the full jail, the tap network, the test host's namespace).

Run:  sudo .venv/bin/python bench/jail.py [--runs 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from ember import paths  # noqa: E402
from ember.agent.protocol import ExecRequest  # noqa: E402
from ember.guest.bundle import ensure_guest  # noqa: E402
from ember.host import jail  # noqa: E402
from ember.host.probe import choose_accel, qemu_version  # noqa: E402
from ember.images import ImageStore  # noqa: E402
from ember.machine import Machine, MachineConfig  # noqa: E402
from ember.sample import write_busybox_image  # noqa: E402

NS = "emb-bench-net"
HOST = "203.0.113.10"
PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"

SINK = r"""
import socket, sys, threading, time
def sink(c):
    n, first = 0, None
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        if first is None:
            first = time.perf_counter()
        n += len(b)
    print(f"{n} {time.perf_counter() - (first or time.perf_counter()):.6f}", flush=True)
    c.close()
def serve(port, fn):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(128)
    while True:
        c, _ = s.accept()
        threading.Thread(target=fn, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=(7001, lambda c: c.close()), daemon=True).start()
print("ready", flush=True)
serve(7000, sink)
"""


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def testnet_up() -> subprocess.Popen[bytes]:
    testnet_down()
    sh("ip", "netns", "add", NS)
    sh("ip", "link", "add", "embb0", "type", "veth", "peer", "name", "eth0", "netns", NS)
    sh("ip", "addr", "add", "198.51.100.5/30", "dev", "embb0")
    sh("ip", "link", "set", "embb0", "up")
    sh("ip", "-n", NS, "addr", "add", "198.51.100.6/30", "dev", "eth0")
    sh("ip", "-n", NS, "addr", "add", f"{HOST}/32", "dev", "eth0")
    sh("ip", "-n", NS, "link", "set", "eth0", "up")
    sh("ip", "-n", NS, "route", "add", "default", "via", "198.51.100.5")
    sh("ip", "route", "add", f"{HOST}/32", "via", "198.51.100.6", "dev", "embb0")
    p = subprocess.Popen(["ip", "netns", "exec", NS, sys.executable, "-c", SINK],
                         stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    return p


def testnet_down() -> None:
    subprocess.run(["ip", "route", "delete", f"{HOST}/32"], capture_output=True)
    subprocess.run(["ip", "link", "delete", "embb0"], capture_output=True)
    subprocess.run(["ip", "netns", "delete", NS], capture_output=True)


def variant(jail_mode: str, backend: str) -> None:
    os.environ["EMBER_JAIL"] = jail_mode
    os.environ["EMBER_NET_BACKEND"] = backend
    jail.policy.cache_clear()


def boot(store: ImageStore, rootfs: Path) -> tuple[Machine, float]:
    guest = ensure_guest(paths.cache_dir())
    t0 = time.perf_counter()
    m = Machine.create(machines_dir=paths.machines_dir(), guest=guest, rootfs=rootfs,
                       accel=choose_accel(None), config=MachineConfig())
    m.start()
    return m, time.perf_counter() - t0


def run(m: Machine, script: str, timeout: float = 300) -> tuple[str, float]:
    t0 = time.perf_counter()
    p = m.exec(ExecRequest(argv=["/bin/sh", "-c", script], env=[PATH]))
    st = m.wait_process(p, timeout=timeout)
    took = time.perf_counter() - t0
    if st.exit_code != 0:
        raise SystemExit(f"{script!r} failed: {p.stderr.decode()}")
    return p.stdout.decode(), took


def med(xs: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(xs), 4), "all": [round(x, 4) for x in xs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--execs", type=int, default=20)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/jail.py needs root (the full jail, taps, namespaces)")
    work = Path(tempfile.mkdtemp(prefix="ember-bench-jail-"))
    os.environ["EMBER_HOME"] = str(work / "home")
    store = ImageStore(paths.images_dir())
    image = store.import_path(write_busybox_image(work / "layout"), tag="bench:latest")
    rootfs = store.rootfs(image)

    boots: dict[str, list[float]] = {"off": [], "full": []}
    execs: dict[str, list[float]] = {"off": [], "full": []}
    for _ in range(args.runs):
        for mode in ("off", "full"):
            variant(mode, "slirp")
            m, took = boot(store, rootfs)
            try:
                assert (jail.policy().mode == "full") == (mode == "full")
                boots[mode].append(took)
                times = [run(m, "true")[1] for _ in range(args.execs)]
                execs[mode].append(statistics.median(times))
            finally:
                m.close()

    sink = testnet_up()
    assert sink.stdout is not None
    mbps: dict[str, list[float]] = {"slirp": [], "tap": []}
    rate: dict[str, list[float]] = {"slirp": [], "tap": []}
    try:
        for _ in range(args.runs):
            for backend in ("slirp", "tap"):
                variant("full", backend)
                m, _ = boot(store, rootfs)
                try:
                    assert m.spec.net_backend == backend
                    run(m, f"dd if=/dev/zero bs=65536 count={args.mib * 16} 2>/dev/null "
                           f"| nc -w 10 {HOST} 7000")
                    n, secs = sink.stdout.readline().split()
                    assert int(n) == args.mib << 20, n
                    mbps[backend].append(int(n) / float(secs) / 1e6)
                    _, took = run(m, f"i=0; while [ $i -lt {args.conns} ]; do "
                                     f"nc -w 5 {HOST} 7001 </dev/null >/dev/null; "
                                     "i=$((i+1)); done")
                    rate[backend].append(args.conns / took)
                finally:
                    m.close()
    finally:
        sink.kill()
        testnet_down()
        variant("", "")

    result = {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(), "qemu": qemu_version(),
                    "accel": choose_accel(None).name},
        "runs": args.runs,
        "boot_s": {k: med(v) for k, v in boots.items()},
        "boot_ratio_full_over_off": round(statistics.median(boots["full"])
                                          / statistics.median(boots["off"]), 3),
        "exec_roundtrip_s": {k: med(v) for k, v in execs.items()},
        "exec_ratio_full_over_off": round(statistics.median(execs["full"])
                                          / statistics.median(execs["off"]), 3),
        "guest_to_host_MB_per_s": {k: med(v) for k, v in mbps.items()},
        "throughput_ratio_tap_over_slirp": round(statistics.median(mbps["tap"])
                                                 / statistics.median(mbps["slirp"]), 3),
        "connections_per_s": {k: med(v) for k, v in rate.items()},
        "connection_rate_ratio_tap_over_slirp": round(statistics.median(rate["tap"])
                                                      / statistics.median(rate["slirp"]), 3),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
