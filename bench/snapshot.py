"""Benchmark: warm starts from snapshots against cold boots, clones per second, clone memory.

Interleaved in one run, ``--runs`` rounds (medians reported):

* cold ``ember run IMAGE -- true`` (``--cold``: a boot);
* warm ``ember run IMAGE -- true`` (a clone of the shape's boot snapshot);
* ``ember run --from SNAP -- true`` (a clone of a user snapshot);
* under the daemon, create-to-first-exec (create + start + ``exec true``) from
  the image (``cold``, and warm from its boot snapshot) and from a snapshot.

Then: ``ember clone -n 20`` of an idle machine (clones per second, snapshot
included); host memory of the 20 idle clones of that 256 MiB snapshot against
20 booted idle machines, per QEMU from ``/proc/PID/smaps_rollup`` (unique =
Private_Clean + Private_Dirty, and PSS); the snapshot's pause and size on
disk. The accelerator is reported.

Run:  .venv/bin/python bench/snapshot.py [--runs 10] [--clones 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from ember.host.probe import choose_accel, qemu_version  # noqa: E402
from ember.sample import write_busybox_image  # noqa: E402

EMBER = str(ROOT / ".venv" / "bin" / "ember")
IDLE = ["sleep", "100000"]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return elapsed


def smaps(pid: int) -> dict[str, int]:
    """KiB fields of /proc/PID/smaps_rollup."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0])
    return out


def memory_of(pids: list[int]) -> dict[str, float]:
    """Median MiB per QEMU: unique (private) memory, PSS and RSS."""
    rows = [smaps(p) for p in pids]
    unique = [(r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)) / 1024 for r in rows]
    return {"unique_mib_median": round(statistics.median(unique), 1),
            "pss_mib_median": round(statistics.median(r["Pss"] / 1024 for r in rows), 1),
            "rss_mib_median": round(statistics.median(r["Rss"] / 1024 for r in rows), 1),
            "unique_mib_total": round(sum(unique), 1),
            "pss_mib_total": round(sum(r["Pss"] for r in rows) / 1024, 1)}


def med(xs: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(xs), 4), "all": [round(x, 4) for x in xs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--clones", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    accel = choose_accel(None)
    work = Path(tempfile.mkdtemp(prefix="ember-bench-snap-"))
    home = work / "home"
    env = {**os.environ, "EMBER_HOME": str(home)}
    os.environ["EMBER_HOME"] = str(home)
    from ember.sdk import Client

    try:
        layout = write_busybox_image(work / "layout", layers=3)
        subprocess.run([EMBER, "image", "import", "-q", str(layout), "--tag", "bench:latest"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        # The first warm-eligible run boots and keeps the shape's boot snapshot.
        t_first = timed([EMBER, "run", "-q", "bench:latest", "--", "true"], env)
        c = Client(autostart=True, timeout=600)
        tmpl = c.machines.create("bench:latest", name="tmpl", cmd=IDLE)
        snap = tmpl.snapshot("bench-snap")

        cold: list[float] = []
        warm: list[float] = []
        from_snap: list[float] = []
        d_image: list[float] = []
        d_warm: list[float] = []
        d_snap: list[float] = []
        for i in range(args.runs):
            cold.append(timed([EMBER, "run", "-q", "--cold", "bench:latest", "--", "true"], env))
            warm.append(timed([EMBER, "run", "-q", "bench:latest", "--", "true"], env))
            from_snap.append(timed([EMBER, "run", "-q", "--from", "bench-snap", "--", "true"],
                                   env))
            t0 = time.perf_counter()
            m = c.machines.create("bench:latest", name=f"img-{i}", cmd=IDLE, cold=True)
            m.exec(["true"])
            d_image.append(time.perf_counter() - t0)
            m.remove(force=True)
            t0 = time.perf_counter()
            m = c.machines.create("bench:latest", name=f"warm-{i}", cmd=IDLE)
            m.exec(["true"])
            d_warm.append(time.perf_counter() - t0)
            m.remove(force=True)
            t0 = time.perf_counter()
            m = c.machines.create(snapshot="bench-snap", name=f"snap-{i}")
            m.exec(["true"])
            d_snap.append(time.perf_counter() - t0)
            m.remove(force=True)
            print(f"round {i + 1}/{args.runs}: cold {cold[-1]:.3f} s, warm {warm[-1]:.3f} s, "
                  f"--from {from_snap[-1]:.3f} s, daemon image {d_image[-1]:.3f} s "
                  f"(warm {d_warm[-1]:.3f} s), "
                  f"daemon snapshot {d_snap[-1]:.3f} s", file=sys.stderr)

        # Clones per second, and the memory of idle clones against idle booted machines.
        time.sleep(2)
        t0 = time.perf_counter()
        clone_snap, clones = tmpl.clone(args.clones, tag="bench-clones")
        t_clone = time.perf_counter() - t0
        time.sleep(5)  # let them settle idle
        clone_mem = memory_of([m.refresh().pid or 0 for m in clones])
        for m in clones:
            m.remove(force=True)
        booted = []
        t0 = time.perf_counter()
        for i in range(args.clones):
            booted.append(c.machines.create("bench:latest", name=f"boot-{i}", cmd=IDLE,
                                            cold=True))
        t_boot = time.perf_counter() - t0
        time.sleep(5)
        boot_mem = memory_of([m.refresh().pid or 0 for m in booted])
        for m in booted:
            m.remove(force=True)

        result = {
            "machine": {
                "cpus": os.cpu_count(), "python": platform.python_version(),
                "kernel": platform.release(), "qemu": qemu_version(),
                "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                    / 2**30, 1),
                "load_before": os.getloadavg()[0],
            },
            "accelerator": {"name": accel.name, "reason": accel.reason},
            "runs": args.runs,
            "first_run_boot_and_keep_snapshot_s": round(t_first, 4),
            "cold_run_s": med(cold), "warm_run_s": med(warm), "run_from_snapshot_s": med(from_snap),
            "warm_over_cold": round(statistics.median(warm) / statistics.median(cold), 3),
            "from_snapshot_over_cold": round(statistics.median(from_snap)
                                             / statistics.median(cold), 3),
            "daemon_create_to_first_exec_s": {"image_cold": med(d_image),
                                              "image_warm": med(d_warm),
                                              "snapshot": med(d_snap)},
            "snapshot": {"pause_ms": snap.pause_ms, "size_on_disk_mib":
                         round(snap.size_on_disk / 2**20, 1),
                         "memory_allocated_mib": round(snap.memory_allocated / 2**20, 1),
                         "clone_snapshot_pause_ms": clone_snap.pause_ms},
            "clone_n": {"n": args.clones, "seconds": round(t_clone, 3),
                        "clones_per_s": round(args.clones / t_clone, 2)},
            "boot_n": {"n": args.clones, "seconds": round(t_boot, 3),
                       "machines_per_s": round(args.clones / t_boot, 2)},
            "idle_memory_per_qemu": {"clones": clone_mem, "booted": boot_mem,
                                     "unique_ratio": round(clone_mem["unique_mib_median"]
                                                           / boot_mem["unique_mib_median"], 3),
                                     "pss_ratio": round(clone_mem["pss_mib_median"]
                                                        / boot_mem["pss_mib_median"], 3)},
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        tmpl.remove(force=True)  # a daemon's machines outlive it
        for s in c.snapshots.list():
            c.snapshots.remove(s.id, force=True)
        c.close()
    finally:
        _cleanup(home, work)


def _cleanup(home: Path, work: Path) -> None:
    """Stop the benchmark's daemon, drop the boot snapshots of its images, remove its files."""
    sys.path.insert(0, str(ROOT / "bench"))
    from boot import _stop_daemon  # type: ignore[import-not-found]

    _stop_daemon(home)
    from ember.snapshots.start import boot_store

    store = boot_store()
    for s in store.all():
        if s.manifest.rootfs.path.startswith(str(work)):
            store.remove(s.id)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
