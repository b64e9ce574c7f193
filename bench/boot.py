"""Benchmark: cold `ember run IMAGE -- true` against the floor of a bare QEMU boot.

The floor is `qemu-system-x86_64` booting the same kernel, same machine type
and memory, with an initramfs whose /init powers off at once and no devices.
Both are run ten times, interleaved (floor, ember, floor, ember...), so that
drift in the machine's load hits both alike. A third series, interleaved too,
boots the floor with ``quiet`` added: the difference is what the kernel's boot
messages on the serial console cost (Ember's guests print them). Reported: medians, their ratio,
peak RSS, the accelerator; and the time to import an image the first time
(cache miss: blobs, unpack, erofs build) and the second (cache hit).

Run:  .venv/bin/python bench/boot.py [--runs 10] [--json out.json]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from ember import paths  # noqa: E402
from ember.guest.bundle import ensure_baseline_guest, ensure_guest  # noqa: E402
from ember.host.probe import choose_accel, qemu_version  # noqa: E402
from ember.machine import guest_cmdline  # noqa: E402
from ember.sample import write_busybox_image  # noqa: E402

EMBER = str(ROOT / ".venv" / "bin" / "ember")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """Wall seconds, exit status and peak RSS (KiB, max over the process tree) of ``cmd``."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        assert proc.stderr is not None
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr.read().decode()}")
    return elapsed, proc.returncode, usage.ru_maxrss


PHASES_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
from ember.run import RunRequest, exec_request, prepare
t1 = time.perf_counter()
run_req = RunRequest(image="bench:latest", command=("true",), cold=True)
prep = prepare(run_req, lambda s: None)
m, process = prep.machine, prep.process
t2 = time.perf_counter()
ready = m.start()
t3 = time.perf_counter()
m.wait_process(m.exec(exec_request(run_req, process)))
t4 = time.perf_counter()
m.kill()
t5 = time.perf_counter()
m.close()
t6 = time.perf_counter()
print(json.dumps({"python_imports": t1 - t0, "prepare": t2 - t1, "qemu_start_to_ready": t3 - t2,
                  "guest_uptime_at_ready": ready.uptime_ms / 1000, "first_exec_true": t4 - t3,
                  "shutdown": t5 - t4, "cleanup": t6 - t5}))
"""


def phases(runs: int, env: dict[str, str]) -> dict[str, float]:
    """Median of each phase of `ember run IMAGE -- true`, timed inside the process."""
    samples: dict[str, list[float]] = {}
    python = str(ROOT / ".venv" / "bin" / "python")
    for _ in range(runs):
        out = subprocess.run([python, "-c", PHASES_SCRIPT], env=env, capture_output=True,
                             text=True, check=True).stdout
        for k, v in json.loads(out).items():
            samples.setdefault(k, []).append(v)
    return {k: round(statistics.median(v), 4) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--memory", type=int, default=256)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    accel = choose_accel(None)
    guest = ensure_guest(paths.cache_dir(), print)
    floor = ensure_baseline_guest(paths.cache_dir(), print)
    work = Path(tempfile.mkdtemp(prefix="ember-bench-"))
    env = {**os.environ, "EMBER_HOME": str(work / "home")}
    try:
        layout = write_busybox_image(work / "layout", layers=3)
        # `ember image import` goes through the daemon: start it first, untimed.
        subprocess.run([EMBER, "image", "ls", "-q"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        # Import: first (cold store: copy blobs, unpack layers, build erofs) then again (hit).
        t_first, _, _ = timed([EMBER, "image", "import", "-q", str(layout), "--tag",
                               "bench:latest"], env)
        t_first_run, _, _ = timed([EMBER, "run", "-q", "--cold", "bench:latest", "--", "true"], env)
        t_second, _, _ = timed([EMBER, "image", "import", "-q", str(layout), "--tag",
                                "bench:latest"], env)

        floor_cmd = [
            shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
            "-M", "microvm,x-option-roms=off,isa-serial=on,acpi=off",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-m", f"{args.memory}M", "-kernel", str(floor.kernel), "-initrd", str(floor.initramfs),
            "-append", guest_cmdline(floor), "-serial", f"file:{work / 'floor-console.log'}",
            "-accel", "kvm" if accel.name == "kvm" else "tcg",
        ] + (["-cpu", "host"] if accel.name == "kvm" else [])
        quiet_cmd = [a + " quiet" if a == guest_cmdline(floor) else a for a in floor_cmd]
        ember_cmd = [EMBER, "run", "-q", "--cold", "-m", str(args.memory), "bench:latest", "--",
                     "true"]

        floor_t: list[float] = []
        quiet_t: list[float] = []
        ember_t: list[float] = []
        floor_rss: list[int] = []
        ember_rss: list[int] = []
        for i in range(args.runs):
            t, _, rss = timed(floor_cmd, env)
            floor_t.append(t)
            floor_rss.append(rss)
            t, _, rss = timed(ember_cmd, env)
            ember_t.append(t)
            ember_rss.append(rss)
            quiet_t.append(timed(quiet_cmd, env)[0])
            print(f"run {i + 1}/{args.runs}: floor {floor_t[-1]:.3f} s, ember {ember_t[-1]:.3f} s,"
                  f" floor quiet {quiet_t[-1]:.3f} s", file=sys.stderr)
        result = {
            "machine": {
                "cpus": os.cpu_count(), "python": platform.python_version(),
                "kernel": platform.release(), "qemu": qemu_version(),
                "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                    / 2**30, 1),
            },
            "accelerator": {"name": accel.name, "reason": accel.reason},
            "guest_memory_mib": args.memory,
            "runs": args.runs,
            "floor_s": {"median": statistics.median(floor_t), "all": floor_t},
            "ember_s": {"median": statistics.median(ember_t), "all": ember_t},
            "ratio": statistics.median(ember_t) / statistics.median(floor_t),
            "floor_quiet_s": {"median": statistics.median(quiet_t), "all": quiet_t},
            "console_messages_cost_s": statistics.median(floor_t) - statistics.median(quiet_t),
            "peak_rss_mib": {"floor_median": statistics.median(floor_rss) / 1024,
                             "ember_median": statistics.median(ember_rss) / 1024},
            "import_s": {"first_import_with_rootfs_build": t_first,
                         "second_import_cache_hit": t_second,
                         "first_run_after_import": t_first_run},
            "ember_phases_median_s": phases(args.runs, env),
            "kernel": str(guest.kernel),
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        _stop_daemon(work / "home")
        shutil.rmtree(work, ignore_errors=True)


def _stop_daemon(home: Path) -> None:
    """Stop the daemon the CLI started in the benchmark's data dir, and wait for it."""
    import select
    import signal

    try:
        pid = int((home / "daemon.pid").read_text())
        fd = os.pidfd_open(pid)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return
    try:
        if f"EMBER_HOME={home}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            os.kill(pid, signal.SIGTERM)
            select.select([fd], [], [], 30)
    except OSError:
        pass
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
