"""Benchmark: a guest's storage against the host's disk, with fio on both sides.

Interleaved, ``--runs`` rounds (medians reported). One guest (1 vCPU, 256 MiB)
has a named volume at /data (a SCSI LUN), a host share at /share (9p) and its
writable root layer on disk (ext4 on virtio-blk, at /); a second guest has
the in-memory root (tmpfs). In each, fio (Debian's, with its libraries, in an
image built here on the busybox sample) runs four jobs on a ``--mib`` MiB file:
sequential write and read (1 MiB blocks), random write and read (4 KiB
blocks, ``--rand-seconds`` each), psync, page cache dropped before reads and
writes fsync'd at the end (``end_fsync``; 9p has no O_DIRECT). The same jobs
run on the host against a file on the filesystem holding the volume's image.

Run:  sudo .venv/bin/python bench/volumes.py [--runs 3] [--mib 128] [--json out.json]
(installs fio with apt when it is missing)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
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
from ember.sample import DEFAULT_CONFIG, busybox_layers, write_oci_layout  # noqa: E402
from ember.volumes.layer import RootLayer  # noqa: E402
from ember.volumes.shares import share  # noqa: E402
from ember.volumes.store import VolumeRequest, VolumeStore  # noqa: E402

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
JOBS = ("seq_write", "seq_read", "rand_write", "rand_read")


def fio_layer() -> bytes:
    """/usr/bin/fio and every library it loads, at their host paths."""
    fio = shutil.which("fio")
    if fio is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "fio"], check=True,
                       capture_output=True)
        fio = shutil.which("fio")
    assert fio is not None
    libs = [line.split("=>")[-1].split("(")[0].strip()
            for line in subprocess.run(["ldd", fio], capture_output=True, text=True,
                                       check=True).stdout.splitlines()]
    files = [os.path.realpath(fio)] + [p for p in libs if p.startswith("/")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for f in files:
            real = os.path.realpath(f)
            tf.add(real, arcname=f.lstrip("/"))  # under the name the loader asks for
        tf.add(os.path.realpath(fio), arcname="usr/bin/fio")
    return buf.getvalue()


def fio_args(job: str, path: str, mib: int, seconds: int) -> list[str]:
    rw = {"seq_write": "write", "seq_read": "read", "rand_write": "randwrite",
          "rand_read": "randread"}[job]
    bs = "1M" if job.startswith("seq") else "4k"
    args = ["fio", "--name=b", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
            f"--size={mib}M", "--ioengine=psync", "--output-format=json"]
    if job.startswith("rand"):
        args += ["--time_based=1", f"--runtime={seconds}"]
    if job.endswith("write"):
        args += ["--end_fsync=1"]
    return args


def bandwidth(out: bytes, job: str) -> float:
    """MB/s of fio's JSON report."""
    doc = json.loads(out[out.index(b"{"):])
    side = doc["jobs"][0]["write" if job.endswith("write") else "read"]
    return float(side["bw_bytes"]) / 1e6


def in_guest(m: Machine, argv: list[str]) -> bytes:
    p = m.exec(ExecRequest(argv=argv, env=[PATH], user="root"))
    st = m.wait_process(p, timeout=900)
    if st.exit_code != 0:
        raise SystemExit(f"{argv!r} failed: {p.stderr.decode()}")
    return p.stdout


def drop_caches(m: Machine | None) -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")
    if m is not None:
        in_guest(m, ["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"])


def measure(m: Machine | None, path: str, job: str, args: argparse.Namespace) -> float:
    if job.endswith("read"):
        drop_caches(m)
    argv = fio_args(job, path, args.mib, args.rand_seconds)
    out = in_guest(m, argv) if m is not None else subprocess.run(
        argv, capture_output=True, check=True).stdout
    return bandwidth(out, job)


def med(xs: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(xs), 1), "all": [round(x, 1) for x in xs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--rand-seconds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/volumes.py needs root (it drops the host's page cache)")
    work = Path(tempfile.mkdtemp(prefix="ember-bench-vol-"))
    os.environ["EMBER_HOME"] = str(work / "home")
    store = ImageStore(paths.images_dir())
    layout = write_oci_layout(work / "layout", [*busybox_layers(1), fio_layer()],
                              DEFAULT_CONFIG, tag="bench-fio:latest")
    rootfs = store.rootfs(store.import_path(layout, tag="bench-fio:latest"))
    volumes = VolumeStore(paths.volumes_dir())
    vol = volumes.create("bench", (args.mib * 2 + 64) << 20)
    share_dir = work / "share"
    share_dir.mkdir()
    guest = ensure_guest(paths.cache_dir())
    accel = choose_accel(None)
    disks = Machine.create(
        machines_dir=paths.machines_dir(), guest=guest, rootfs=rootfs, accel=accel,
        config=MachineConfig(
            volumes=(volumes.mount(VolumeRequest("bench", "/data")),),
            shares=(share(str(share_dir), "/share"),),
            layer=RootLayer(work / "layer.img", (args.mib * 2 + 256) << 20)))
    tmpfs = Machine.create(machines_dir=paths.machines_dir(), guest=guest, rootfs=rootfs,
                           accel=accel, config=MachineConfig(memory_mib=512))
    disks.start()
    tmpfs.start()
    places: dict[str, tuple[Machine | None, str]] = {
        "volume": (disks, "/data/f"), "root_layer_disk": (disks, "/f"),
        "share_9p": (disks, "/share/f"), "root_tmpfs": (tmpfs, "/f"),
        "host": (None, str(vol.dir / "host-test")),
    }
    rows: dict[str, dict[str, list[float]]] = {p: {j: [] for j in JOBS} for p in places}
    try:
        for _ in range(args.runs):
            for place, (m, path) in places.items():
                for job in JOBS:
                    rows[place][job].append(measure(m, path, job, args))
                if m is not None:
                    in_guest(m, ["rm", "-f", path])
                else:
                    Path(path).unlink(missing_ok=True)
    finally:
        for mm in (disks, tmpfs):
            mm.shutdown()
            mm.close()
        volumes.remove("bench")
        shutil.rmtree(work, ignore_errors=True)
    host = {j: statistics.median(rows["host"][j]) for j in JOBS}
    result = {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(), "qemu": qemu_version(),
                    "accel": accel.name},
        "runs": args.runs, "mib": args.mib, "rand_seconds": args.rand_seconds,
        "MB_per_s": {p: {j: med(v) for j, v in jobs.items()} for p, jobs in rows.items()},
        "over_host": {p: {j: round(statistics.median(v) / host[j], 3) for j, v in jobs.items()}
                      for p, jobs in rows.items() if p != "host"},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
