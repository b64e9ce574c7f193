"""Benchmark: how quick the CLI feels, against ``ember --version`` in the same run.

A daemon on a fresh data dir with one running machine (the busybox sample,
``sleep``); then, interleaved, ``--runs`` rounds of ``ember --version`` (the
interpreter and the argument parser: the floor of any command), ``ember ps``,
``ember exec M -- true`` and ``ember inspect M``, each a fresh process, as a
user's shell runs them. Medians, and each command's ratio to ``--version``.

Run:  .venv/bin/python bench/cli.py [--runs 20] [--json out.json]
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

from ember.sample import write_busybox_image  # noqa: E402

EMBER = str(ROOT / ".venv" / "bin" / "ember")


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ember-bench-cli-"))
    env = {**os.environ, "EMBER_HOME": str(work / "home")}
    try:
        layout = write_busybox_image(work / "layout", layers=2)
        subprocess.run([EMBER, "image", "import", "-q", str(layout), "--tag", "bench:1"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([EMBER, "run", "-d", "--name", "m", "bench:1", "--", "sleep", "1000000"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        cmds = {"version": [EMBER, "--version"], "ps": [EMBER, "ps"],
                "exec": [EMBER, "exec", "m", "--", "true"], "inspect": [EMBER, "inspect", "m"]}
        for c in cmds.values():  # warm the page cache and the daemon's first-call paths
            timed(c, env)
        results: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(args.runs):
            for k, c in cmds.items():
                results[k].append(timed(c, env))
        med = {k: statistics.median(v) for k, v in results.items()}
        out = {
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
            "runs": args.runs,
            "median_ms": {k: round(v * 1000, 1) for k, v in med.items()},
            "all_ms": {k: [round(x * 1000, 1) for x in v] for k, v in results.items()},
            "over_version": {k: round(med[k] / med["version"], 2) for k in cmds
                             if k != "version"},
        }
        text = json.dumps(out, indent=2)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")
    finally:
        subprocess.run([EMBER, "rm", "-f", "m"], env=env, capture_output=True)
        sys.path.insert(0, str(ROOT / "bench"))
        from boot import _stop_daemon  # type: ignore[import-not-found]

        _stop_daemon(work / "home")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
