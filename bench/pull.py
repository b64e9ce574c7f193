"""Benchmark: ``ember pull`` from a loopback registry against ``podman pull`` and a floor.

The image (built once, cached under the work dir): three gzip layers made from
this host's files, about 250 MB unpacked and some 14,000 entries: ``/usr/include``
(a distribution's many small files), ``/usr/lib/python3.11`` (a Python layer) and
``/usr/libexec``. It is pushed to a real docker-registry 2.8 on 127.0.0.1.

Interleaved, ``--runs`` rounds, every one from cold caches (a fresh Ember data dir
and daemon; a fresh podman ``--root``; page caches are left warm for all alike),
each timed step after a ``sync`` (so none pays for the writeback of another):

* ``ember pull -q REF`` through a running daemon;
* ``podman pull -q REF`` (overlay storage, as root);
* the floor: ``curl`` of each blob in sequence, then ``tar -xzf`` of each layer
  into one directory, then ``mkfs.erofs`` of it (each phase reported; also with
  the tree on a tmpfs, where Ember unpacks when it has room);
* ``ember image import -q LAYOUT`` of the same image from an OCI layout on disk.

Run:  .venv/bin/python bench/pull.py [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from registry_fixtures import start_registry  # noqa: E402

from ember.sample import write_oci_layout  # noqa: E402

EMBER = str(ROOT / ".venv" / "bin" / "ember")
LAYERS = ("usr/include", "usr/lib/python3.11", "usr/libexec")


def build_layout(dest: Path) -> Path:
    if (dest / "index.json").exists():
        return dest
    tars = []
    for d in LAYERS:
        out = dest.parent / (d.replace("/", "_") + ".tar")
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
            tf.add(f"/{d}", arcname=d)
        tars.append(out.read_bytes())
        out.unlink()
    write_oci_layout(dest, tars, {"Cmd": ["/bin/sh"]}, tag="big:1")
    return dest


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    os.sync()  # every contender starts with no writeback of the others pending
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): "
                         f"{proc.stderr.decode()[-2000:]}")
    return time.perf_counter() - t


class Daemon:
    def __init__(self, home: Path) -> None:
        self.env = {**os.environ, "EMBER_HOME": str(home)}
        home.mkdir(parents=True)
        self.proc = subprocess.Popen([EMBER, "serve"], env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        sock = home / "ember.sock"
        for _ in range(300):
            if sock.exists():
                return
            time.sleep(0.05)
        raise SystemExit("the daemon did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)


def floor(host: str, repo: str, layout: Path, work: Path, scratch: Path) -> dict[str, float]:
    """curl each blob in sequence, tar -xzf each layer, mkfs.erofs: the phases' times."""
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" /
                           index["manifests"][0]["digest"].split(":")[1]).read_text())
    blobs = work / "blobs"
    blobs.mkdir()
    os.sync()
    t = time.perf_counter()
    for d in [manifest["config"], *manifest["layers"]]:
        subprocess.run(["curl", "-sSf", "-o", str(blobs / d["digest"].split(":")[1]),
                        f"http://{host}/v2/{repo}/blobs/{d['digest']}"], check=True)
    t_fetch = time.perf_counter() - t
    tree = Path(tempfile.mkdtemp(dir=scratch, prefix="floor-tree-"))
    os.sync()
    t = time.perf_counter()
    for d in manifest["layers"]:
        subprocess.run(["tar", "-C", str(tree), "-xzf", str(blobs / d["digest"].split(":")[1])],
                       check=True)
    t_tar = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run(["mkfs.erofs", "--quiet", str(work / "floor.erofs"), str(tree)], check=True,
                   stdout=subprocess.DEVNULL)
    t_mkfs = time.perf_counter() - t
    shutil.rmtree(tree)
    return {"fetch": t_fetch, "tar": t_tar, "mkfs": t_mkfs}


def med(xs: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(xs), 3), "all": [round(x, 3) for x in xs]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ember-bench-pull")
    args = ap.parse_args()
    if shutil.which("podman") is None:
        raise SystemExit("podman is not installed (apt-get install podman)")
    args.work.mkdir(parents=True, exist_ok=True)
    layout = build_layout(args.work / "layout")
    size = sum(p.stat().st_size for p in (layout / "blobs" / "sha256").iterdir())
    rounds = Path(tempfile.mkdtemp(dir=args.work, prefix="rounds-"))
    results: dict[str, list[float]] = {k: [] for k in (
        "ember_pull", "podman_pull", "floor_fetch", "floor_tar", "floor_mkfs",
        "floor_tar_tmpfs", "floor_mkfs_tmpfs", "ember_import")}
    with start_registry(rounds / "registry") as reg:
        reg.push(layout, "big:1")
        ref = f"{reg.host}/big:1"
        try:
            for i in range(args.runs):
                r = rounds / str(i)
                d = Daemon(r / "ember")
                try:
                    results["ember_pull"].append(timed([EMBER, "pull", "-q", ref], d.env))
                finally:
                    d.stop()
                results["podman_pull"].append(timed([
                    "podman", "--root", str(r / "podman"), "--runroot", str(r / "podman-run"),
                    "--storage-driver", "overlay", "pull", "-q", "--tls-verify=false", ref]))
                subprocess.run(["podman", "--root", str(r / "podman"), "--runroot",
                                str(r / "podman-run"), "--storage-driver", "overlay", "rmi",
                                "-af"], capture_output=True)
                (r / "floor").mkdir()
                f = floor(reg.host, "big", layout, r / "floor", r / "floor")
                results["floor_fetch"].append(f["fetch"])
                results["floor_tar"].append(f["tar"])
                results["floor_mkfs"].append(f["mkfs"])
                (r / "floor-tmpfs").mkdir()
                shm = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="ember-bench-"))
                try:
                    f = floor(reg.host, "big", layout, r / "floor-tmpfs", shm)
                finally:
                    shutil.rmtree(shm, ignore_errors=True)
                results["floor_tar_tmpfs"].append(f["tar"])
                results["floor_mkfs_tmpfs"].append(f["mkfs"])
                d = Daemon(r / "ember-import")
                try:
                    results["ember_import"].append(
                        timed([EMBER, "image", "import", "-q", str(layout)], d.env))
                finally:
                    d.stop()
                shutil.rmtree(r, ignore_errors=True)
                print(f"round {i + 1}/{args.runs}: " + ", ".join(
                    f"{k} {v[-1]:.2f} s" for k, v in results.items()), file=sys.stderr)
        finally:
            shutil.rmtree(rounds, ignore_errors=True)
    m = {k: statistics.median(v) for k, v in results.items()}
    floor_pull = m["floor_fetch"] + m["floor_tar"] + m["floor_mkfs"]
    floor_import = m["floor_tar"] + m["floor_mkfs"]
    floor_import_tmpfs = m["floor_tar_tmpfs"] + m["floor_mkfs_tmpfs"]
    out = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "image": {"layers": list(LAYERS), "compressed_bytes": size},
        "runs": args.runs,
        "seconds": {k: med(v) for k, v in results.items()},
        "floor_pull_s": round(floor_pull, 3),
        "floor_import_s": round(floor_import, 3),
        "floor_import_tmpfs_s": round(floor_import_tmpfs, 3),
        "ember_pull_over_podman": round(m["ember_pull"] / m["podman_pull"], 3),
        "ember_pull_over_floor": round(m["ember_pull"] / floor_pull, 3),
        "ember_import_over_floor": round(m["ember_import"] / floor_import, 3),
        "ember_import_over_tmpfs_floor": round(m["ember_import"] / floor_import_tmpfs, 3),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
