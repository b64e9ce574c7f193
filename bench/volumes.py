"""Benchmark: sequential throughput of a guest's storage against the host's disk.

Interleaved, ``--runs`` rounds (medians reported): in a guest (1 vCPU, 256 MiB)
with a named volume at /data (a SCSI LUN), a host share at /share (9p) and
its writable root layer on disk (ext4 on virtio-blk), ``dd`` writes ``--mib``
MiB of zeros to each and syncs, then reads them back after dropping the
guest's page cache (and the host's, for the share); the same ``dd`` runs on
the host against a file on the filesystem holding the images (fsync'd; read
after dropping the host's caches); and a second guest writes the same amount
to an in-memory writable root (tmpfs). fio is not in the guest image; busybox
``dd`` with 1 MiB blocks is, so random I/O is not measured.

Run:  sudo .venv/bin/python bench/volumes.py [--runs 3] [--mib 256] [--json out.json]
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
from ember.host.probe import choose_accel, qemu_version  # noqa: E402
from ember.images import ImageStore  # noqa: E402
from ember.machine import Machine, MachineConfig  # noqa: E402
from ember.sample import write_busybox_image  # noqa: E402
from ember.volumes.layer import RootLayer  # noqa: E402
from ember.volumes.shares import share  # noqa: E402
from ember.volumes.store import VolumeRequest, VolumeStore  # noqa: E402

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"


def guest_time(m: Machine, script: str) -> float:
    t0 = time.perf_counter()
    p = m.exec(ExecRequest(argv=["/bin/sh", "-c", script], env=[PATH], user="root"))
    st = m.wait_process(p, timeout=600)
    took = time.perf_counter() - t0
    if st.exit_code != 0:
        raise SystemExit(f"{script!r} failed: {p.stderr.decode()}")
    return took


def host_time(cmd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["sh", "-c", cmd], check=True, capture_output=True)
    return time.perf_counter() - t0


def drop_host_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")


def med(xs: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(xs), 1), "all": [round(x, 1) for x in xs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/volumes.py needs root (it drops the host's page cache)")
    work = Path(tempfile.mkdtemp(prefix="ember-bench-vol-"))
    os.environ["EMBER_HOME"] = str(work / "home")
    store = ImageStore(paths.images_dir())
    rootfs = store.rootfs(store.import_path(write_busybox_image(work / "layout"),
                                            tag="bench:latest"))
    volumes = VolumeStore(paths.data_dir() / "volumes")
    vol = volumes.create("bench", (args.mib * 2 + 64) << 20)
    share_dir = work / "share"
    share_dir.mkdir()
    guest = ensure_guest(paths.cache_dir())
    disks = Machine.create(
        machines_dir=paths.machines_dir(), guest=guest, rootfs=rootfs, accel=choose_accel(None),
        config=MachineConfig(
            volumes=(volumes.mount(VolumeRequest("bench", "/data")),),
            shares=(share(str(share_dir), "/share"),),
            layer=RootLayer(work / "layer.img", (args.mib * 2 + 64) << 20)))
    tmpfs = Machine.create(machines_dir=paths.machines_dir(), guest=guest, rootfs=rootfs,
                           accel=choose_accel(None), config=MachineConfig())
    disks.start()
    tmpfs.start()
    size = args.mib << 20
    rows: dict[str, list[float]] = {k: [] for k in (
        "volume_write", "volume_read", "layer_write", "layer_read", "share_write",
        "share_read", "host_write", "host_read", "tmpfs_root_write")}
    host_file = vol.dir / "host-test"
    dd_w = f"dd if=/dev/zero of={{}} bs=1048576 count={args.mib} conv=fsync 2>/dev/null"
    dd_r = "dd if={} of=/dev/null bs=1048576 2>/dev/null"
    drop = "sync; echo 3 > /proc/sys/vm/drop_caches"
    try:
        for _ in range(args.runs):
            for name, path in (("volume", "/data/f"), ("layer", "/root-f"),
                               ("share", "/share/f")):
                rows[f"{name}_write"].append(size / guest_time(disks, dd_w.format(path)) / 1e6)
                guest_time(disks, drop)
                drop_host_caches()
                rows[f"{name}_read"].append(size / guest_time(disks, dd_r.format(path)) / 1e6)
                guest_time(disks, f"rm -f {path}")
            rows["host_write"].append(size / host_time(dd_w.format(host_file)) / 1e6)
            drop_host_caches()
            rows["host_read"].append(size / host_time(dd_r.format(host_file)) / 1e6)
            rows["tmpfs_root_write"].append(size / guest_time(
                tmpfs, f"dd if=/dev/zero of=/root-f bs=1048576 count={args.mib} 2>/dev/null; "
                       "rm -f /root-f") / 1e6)
    finally:
        for m in (disks, tmpfs):
            m.shutdown()
            m.close()
        host_file.unlink(missing_ok=True)
        volumes.remove("bench")
    def ratio(name: str) -> float:
        return round(statistics.median(rows[name]) / statistics.median(
            rows["host_" + name.rsplit("_", 1)[1]]), 3)

    result = {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(), "qemu": qemu_version(),
                    "accel": choose_accel(None).name},
        "runs": args.runs, "mib": args.mib,
        "MB_per_s": {k: med(v) for k, v in rows.items()},
        "over_host": {k: ratio(k) for k in rows if not k.startswith(("host", "tmpfs"))},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
