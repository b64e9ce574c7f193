"""Benchmarks of the daemon: exec round trip, lifecycle throughput, memory per idle machine.

Each sub-command starts its own ``ember serve`` on a private data dir
(``EMBER_HOME`` in a temporary directory), imports the busybox sample image
through ``POST /v1/images/import``, measures, deletes every machine it made
and stops the daemon. It prints a table and refreshes its block of
docs/benchmarks.md (between ``<!-- bench/daemon.py:NAME -->`` markers; the
hand-written reading after the blocks is left alone).

* ``exec``: the round trip of ``exec -- true`` on a running machine through
  the REST API (``POST /v1/machines/{name}/exec``, one kept-alive httpx
  client), through the agent protocol alone (``ember.machine.Machine`` and
  its ``AgentClient`` in this process, on a second machine of the same
  shape), and the guest's own cost of the same work: a busybox ``sh`` loop
  in the guest that reads ``$EPOCHREALTIME`` (gettimeofday, microseconds),
  runs ``/bin/true`` (ash: fork + execve + wait4, as the agent does) and
  reads the clock again, per iteration. Rounds alternate the four
  measurements (and reverse their order every other round) so that the
  host's load drift hits all alike.
* ``lifecycle``: machines per minute for create -> start -> exec ``true``
  -> delete (force), one client at a time and two clients at once,
  alternating blocks of the two modes.
* ``memory``: PSS and RSS (``/proc/PID/smaps_rollup``) of the QEMU of each of
  N idle machines (main process ``sleep 3600``), the page cache of their
  guest-RAM files (``fincore``), their memory cgroups' charge, and the
  daemon's own PSS.

Run:  .venv/bin/python bench/daemon.py exec|lifecycle|memory|all [--json out.json] [--no-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402

from ember.host.probe import choose_accel, qemu_version  # noqa: E402
from ember.sample import write_busybox_image  # noqa: E402

PYTHON = str(ROOT / ".venv" / "bin" / "python")
DOCS = ROOT / "docs" / "benchmarks.md"
IMAGE = "bench:latest"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SECTION = "## The daemon: exec round trip, lifecycle throughput, memory per machine"


# --- statistics ---------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def ms(x: float) -> str:
    return f"{x * 1000:.2f} ms"


# --- the machine and its load --------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def host_info() -> dict[str, Any]:
    accel = choose_accel(None)
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "qemu": qemu_version(),
        "python": platform.python_version(),
        "accel": accel.name,
        "accel_reason": accel.reason,
    }


def _cpu_times() -> list[int]:
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def foreign_qemus(ours: str) -> int:
    """QEMU processes on the host that are not this benchmark's (other people's VMs)."""
    n = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"qemu-system") or b"/qemu-system" in cmd.split(b"\0", 1)[0]:
            if ours.encode() not in cmd:
                n += 1
    return n


class LoadMeter:
    """The host's load over a benchmark: load average, CPU busy and steal, others' QEMUs."""

    def __init__(self, ours: str) -> None:
        self.ours = ours
        self.start = _cpu_times()
        self.load = [os.getloadavg()[0]]
        self.qemus = [foreign_qemus(ours)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(5.0):
            self.load.append(os.getloadavg()[0])
            self.qemus.append(foreign_qemus(self.ours))

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        end = _cpu_times()
        d = [b - a for a, b in zip(self.start, end, strict=False)]
        total = sum(d) or 1
        idle = d[3] + d[4]
        steal = d[7] if len(d) > 7 else 0
        return {"loadavg_1min": {"min": min(self.load), "max": max(self.load)},
                "cpu_busy_pct": round(100 * (total - idle) / total, 1),
                "cpu_steal_pct": round(100 * steal / total, 1),
                "foreign_qemus": {"min": min(self.qemus), "max": max(self.qemus)}}


# --- a private daemon --------------------------------------------------------------


class Daemon:
    """``ember serve`` on a private data dir, with the sample image imported as bench:latest."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.home = work / "home"
        self.home.mkdir(parents=True)
        self.socket = self.home / "ember.sock"
        self.env = {**os.environ, "EMBER_HOME": str(self.home)}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = work / "daemon.log"

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                            base_url="http://ember", timeout=timeout)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([PYTHON, "-m", "ember", "serve"], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"ember serve exited: {self.log.read_text()[-2000:]}")
            try:
                with self.client() as c:
                    c.get("/v1/version").raise_for_status()
                break
            except (httpx.TransportError, OSError):
                time.sleep(0.05)
        else:
            raise SystemExit("ember serve did not answer within 60 s")
        layout = write_busybox_image(self.work / "layout", layers=3)
        with self.client() as c:
            r = c.post("/v1/images/import", json={"path": str(layout), "tag": IMAGE})
            check(r)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(httpx.HTTPError, OSError), self.client(60) as c:
            for m in c.get("/v1/machines", params={"all": "true"}).json():
                c.delete(f"/v1/machines/{m['id']}", params={"force": "true"})
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def check(r: httpx.Response) -> Any:
    if r.status_code >= 400:
        raise SystemExit(f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text}")
    return r.json() if r.content else None


@contextlib.contextmanager
def daemon() -> Iterator[Daemon]:
    work = Path(tempfile.mkdtemp(prefix="ember-bench-daemon-"))
    d = Daemon(work)
    try:
        d.start()
        yield d
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)


def create_and_start(c: httpx.Client, name: str, memory_mib: int = 256) -> dict[str, Any]:
    check(c.post("/v1/machines", json={"image": IMAGE, "name": name, "memory_mib": memory_mib,
                                       "cmd": ["sleep", "3600"]}))
    m: dict[str, Any] = check(c.post(f"/v1/machines/{name}/start"))
    return m


# --- 1. exec round trip ------------------------------------------------------------

#: One iteration per line of output: the clock before and after fork+exec+wait of /bin/true.
GUEST_LOOP = (
    'n=$1; o=; i=0; '
    'while [ $i -lt $n ]; do a=$EPOCHREALTIME; {cmd}; b=$EPOCHREALTIME; o="$o $a,$b"; '
    'i=$((i+1)); done; echo $o'
)


def parse_loop(out: str) -> list[float]:
    res = []
    for pair in out.split():
        a, b = pair.split(",")
        res.append(float(b) - float(a))
    if not res:
        raise SystemExit(f"guest loop printed nothing usable: {out!r}")
    return res


def bench_exec(args: argparse.Namespace) -> dict[str, Any]:
    from ember import paths
    from ember.agent.protocol import ExecRequest, FrameType, json_frame
    from ember.guest.bundle import ensure_guest
    from ember.images import ImageStore
    from ember.machine import Machine, MachineConfig

    per = args.per_round
    rounds = args.rounds
    with daemon() as d:
        os.environ["EMBER_HOME"] = str(d.home)
        load = LoadMeter(str(d.work))
        http = d.client()
        create_and_start(http, "exec-api")
        # The protocol-only path: a machine of the same shape (1 vCPU, 256 MiB, user
        # network, cgroup limits as the daemon applies them) driven from this process.
        store = ImageStore(paths.images_dir())
        lib = Machine.create(machines_dir=d.work / "lib-machines",
                             guest=ensure_guest(paths.cache_dir(), print),
                             rootfs=store.rootfs(store.resolve(IMAGE)),
                             accel=choose_accel(None), name="exec-lib",
                             config=MachineConfig(cpus=1, memory_mib=256, limit_resources=True))
        lib.start()
        try:
            def api(argv: list[str]) -> str:
                r = http.post("/v1/machines/exec-api/exec", json={"cmd": argv})
                body = check(r)
                if body["exit_code"] != 0:
                    raise SystemExit(f"exec {argv} via the API failed: {body}")
                return str(body["stdout"])

            def agent(argv: list[str]) -> str:
                p = lib.exec(ExecRequest(argv=argv, env=[PATH_ENV], cwd="/", user=""))
                st = lib.wait_process(p, timeout=60)
                if st.exit_code != 0:
                    raise SystemExit(f"exec {argv} via the agent failed: {st}")
                return p.stdout.decode()

            # Diagnostics: the HTTP floor (a request that does no work) and the bare
            # agent channel (a SIGNAL with signal 0 on channel 0: the agent answers ERROR
            # on channel 0 at once; no fork, no exec).
            assert lib.agent is not None
            client = lib.agent
            pong = threading.Event()
            real = client._dispatch_control

            def spy(frame: Any) -> None:
                real(frame)
                pong.set()

            client._dispatch_control = spy  # type: ignore[method-assign]
            logging.getLogger("ember").setLevel(logging.ERROR)  # the ERROR is logged

            def version(_: list[str]) -> str:
                check(http.get("/v1/version"))
                return ""

            def ping(_: list[str]) -> str:
                pong.clear()
                client._send(json_frame(FrameType.SIGNAL, 0, {"signal": 0}))
                if not pong.wait(30):
                    raise SystemExit("the agent did not answer the ping")
                return ""

            def timed(fn: Callable[[list[str]], str], argv: list[str], out: list[float]) -> None:
                for _ in range(per):
                    t0 = time.perf_counter()
                    fn(argv)
                    out.append(time.perf_counter() - t0)

            def loop(fn: Callable[[list[str]], str], cmd: str, out: list[float]) -> None:
                out.extend(parse_loop(fn(["/bin/sh", "-c", GUEST_LOOP.format(cmd=cmd), "sh",
                                          str(per)])))

            clk_argv = ["cat", "/sys/devices/system/clocksource/clocksource0/current_clocksource"]
            # Warm-up: under TCG, every code path runs slow the first time (translation).
            for _ in range(3):
                for fn in (api, agent):
                    timed(fn, ["true"], [])
                    timed(fn, ["/bin/true"], [])
                    loop(fn, "/bin/true", [])
                    loop(fn, ":", [])
                timed(version, [], [])
                timed(ping, [], [])

            s: dict[str, list[float]] = {k: [] for k in (
                "api_true", "api_bin_true", "agent_true", "agent_bin_true",
                "guest_api", "guest_lib", "clock_api", "clock_lib", "http_floor", "ping")}
            steps: list[Callable[[], None]] = [
                lambda: timed(api, ["true"], s["api_true"]),
                lambda: timed(agent, ["true"], s["agent_true"]),
                lambda: loop(api, "/bin/true", s["guest_api"]),
                lambda: loop(agent, "/bin/true", s["guest_lib"]),
                lambda: timed(api, ["/bin/true"], s["api_bin_true"]),
                lambda: timed(agent, ["/bin/true"], s["agent_bin_true"]),
                lambda: loop(api, ":", s["clock_api"]),
                lambda: loop(agent, ":", s["clock_lib"]),
                lambda: timed(version, [], s["http_floor"]),
                lambda: timed(ping, [], s["ping"]),
            ]
            for r in range(rounds):
                for step in (steps if r % 2 == 0 else steps[::-1]):
                    step()
                if r == rounds - 1:  # the guest may have given up its TSC during the run
                    clock = {"api": api(clk_argv).strip(), "lib": agent(clk_argv).strip()}
                print(f"round {r + 1}/{rounds}: api {ms(statistics.median(s['api_true']))}, "
                      f"agent {ms(statistics.median(s['agent_true']))}, "
                      f"guest {ms(statistics.median(s['guest_api']))}", file=sys.stderr)
        finally:
            with contextlib.suppress(Exception):
                lib.kill()
            lib.close()
            http.close()
        noise = load.finish()

    def summary(v: list[float]) -> dict[str, Any]:
        # Per-round means: the guest's clock may tick in 4 ms steps (see clocksource);
        # a mean over a round is unbiased under that quantization, a single sample is not.
        rounds_mean = [statistics.mean(v[i:i + per]) for i in range(0, len(v), per)]
        return {"n": len(v), "median": statistics.median(v), "p99": pct(v, 99),
                "min": min(v), "max": max(v), "round_mean_median": statistics.median(rounds_mean)}

    res: dict[str, Any] = {k: summary(v) for k, v in s.items()}
    rm = {k: v["round_mean_median"] for k, v in res.items()}
    res["ratios"] = {
        "api_over_guest": rm["api_true"] / rm["guest_api"],
        "protocol_over_guest": rm["agent_true"] / rm["guest_lib"],
        "api_over_protocol": rm["api_true"] / rm["agent_true"],
        "plain_medians_api_over_guest": res["api_true"]["median"] / res["guest_api"]["median"],
        "plain_medians_protocol_over_guest":
            res["agent_true"]["median"] / res["guest_lib"]["median"],
    }
    res["clocksource"] = clock
    res["noise"] = noise
    res["rounds"] = rounds
    res["per_round"] = per
    return res


def exec_table(res: dict[str, Any]) -> str:
    clk = res["clocksource"]
    rows = [
        ("API: `POST /exec {\"cmd\": [\"true\"]}`", "api_true"),
        ("API: `[\"/bin/true\"]` (no PATH search)", "api_bin_true"),
        ("agent protocol only: `[\"true\"]`", "agent_true"),
        ("agent protocol only: `[\"/bin/true\"]`", "agent_bin_true"),
        (f"guest: fork+exec+wait of `/bin/true`, API machine (clock: {clk['api']})",
         "guest_api"),
        (f"guest: the same, agent machine (clock: {clk['lib']})", "guest_lib"),
        ("guest: the two clock reads alone (`:` instead), API machine", "clock_api"),
        ("HTTP floor: `GET /v1/version`", "http_floor"),
        ("agent channel ping: SIGNAL 0 on channel 0 → ERROR", "ping"),
    ]
    out = ["| round trip | n | median | p99 | min | max | per-round mean (median of rounds) |",
           "|---|--:|--:|--:|--:|--:|--:|"]
    for label, k in rows:
        r = res[k]
        out.append(f"| {label} | {r['n']} | {ms(r['median'])} | {ms(r['p99'])} | "
                   f"{ms(r['min'])} | {ms(r['max'])} | **{ms(r['round_mean_median'])}** |")
    q = res["ratios"]

    def goal(x: float) -> str:
        return "met" if x <= 1.25 else "**not met**"

    out += ["", "| ratio (per-round means) | value | goal | (ratio of plain medians) |",
            "|---|--:|---|--:|",
            f"| API / guest | **{q['api_over_guest']:.2f}** | ≤ 1.25: "
            f"{goal(q['api_over_guest'])} | {q['plain_medians_api_over_guest']:.2f} |",
            f"| protocol / guest | **{q['protocol_over_guest']:.2f}** | ≤ 1.25: "
            f"{goal(q['protocol_over_guest'])} | {q['plain_medians_protocol_over_guest']:.2f} |",
            f"| API / protocol | {q['api_over_protocol']:.2f} | | |"]
    rm = {k: v["round_mean_median"] for k, v in res.items()
          if isinstance(v, dict) and "round_mean_median" in v}
    out += ["", "Where the API round trip goes (differences of the per-round means):", "",
            "| part | time |", "|---|--:|",
            f"| the guest's own fork+exec+wait of `/bin/true` | {ms(rm['guest_lib'])} |",
            f"| agent channel round trip (ping) | {ms(rm['ping'])} |",
            f"| agent's exec path beyond both (protocol − guest − ping) | "
            f"{ms(rm['agent_true'] - rm['guest_lib'] - rm['ping'])} |",
            f"| of which the PATH search for `true` (`true` − `/bin/true`) | "
            f"{ms(rm['agent_true'] - rm['agent_bin_true'])} |",
            f"| HTTP + daemon (API − protocol) | {ms(rm['api_true'] - rm['agent_true'])} |",
            f"| of which an empty request (`GET /v1/version`) | {ms(rm['http_floor'])} |",
            "", f"Samples: {res['rounds']} rounds × {res['per_round']} of each kind, after a "
            "warm-up of 3 rounds. The guest loop's clock is its `$EPOCHREALTIME`; a guest whose "
            "clock source is `refined-jiffies` reads time in 4 ms steps, so its single samples "
            "(median, p99) are quantized and only its per-round means count."]
    return "\n".join(out)


# --- 2. lifecycle throughput --------------------------------------------------------


def lifecycle_one(c: httpx.Client, name: str, phases: dict[str, list[float]]) -> None:
    t0 = time.perf_counter()
    check(c.post("/v1/machines", json={"image": IMAGE, "name": name, "cmd": ["sleep", "3600"]}))
    t1 = time.perf_counter()
    check(c.post(f"/v1/machines/{name}/start"))
    t2 = time.perf_counter()
    body = check(c.post(f"/v1/machines/{name}/exec", json={"cmd": ["true"]}))
    if body["exit_code"] != 0:
        raise SystemExit(f"exec true in {name}: {body}")
    t3 = time.perf_counter()
    r = c.delete(f"/v1/machines/{name}", params={"force": "true"})
    if r.status_code != 204:
        raise SystemExit(f"delete {name}: {r.status_code} {r.text}")
    t4 = time.perf_counter()
    for k, v in (("create", t1 - t0), ("start", t2 - t1), ("exec", t3 - t2),
                 ("delete", t4 - t3), ("cycle", t4 - t0)):
        phases.setdefault(k, []).append(v)


def bench_lifecycle(args: argparse.Namespace) -> dict[str, Any]:
    blocks = args.blocks
    per_block = args.per_block
    res: dict[str, Any] = {}
    with daemon() as d:
        load = LoadMeter(str(d.work))
        with d.client() as c:  # warm-up: first boot, first exec
            lifecycle_one(c, "warm", {})
        modes: dict[str, dict[str, Any]] = {
            m: {"machines": 0, "wall": 0.0, "phases": {}} for m in ("sequential", "concurrent2")}
        n = 0
        for b in range(blocks):
            order = ("sequential", "concurrent2") if b % 2 == 0 else ("concurrent2", "sequential")
            for mode in order:
                st = modes[mode]
                clients = 1 if mode == "sequential" else 2
                errors: list[BaseException] = []

                def worker(k: int, base: int, st: dict[str, Any] = st,
                           errors: list[BaseException] = errors) -> None:
                    try:
                        with d.client() as c:
                            for i in range(per_block):
                                lifecycle_one(c, f"lc-{base}-{k}-{i}", st["phases"])
                    except BaseException as exc:  # noqa: BLE001 - reported below
                        errors.append(exc)

                n += 1
                t0 = time.perf_counter()
                threads = [threading.Thread(target=worker, args=(k, n)) for k in range(clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                if errors:
                    raise SystemExit(f"{mode}: {errors[0]!r}")
                st["machines"] += clients * per_block
                st["wall"] += wall
                print(f"block {b + 1}/{blocks} {mode}: {clients * per_block} machines in "
                      f"{wall:.1f} s ({60 * clients * per_block / wall:.1f}/min)", file=sys.stderr)
        res["noise"] = load.finish()
    for mode, st in modes.items():
        res[mode] = {
            "machines": st["machines"], "wall_s": st["wall"],
            "per_minute": 60 * st["machines"] / st["wall"],
            "phases_median_s": {k: statistics.median(v) for k, v in st["phases"].items()},
            "cycle_p90_s": pct(st["phases"]["cycle"], 90),
        }
    res["speedup"] = res["concurrent2"]["per_minute"] / res["sequential"]["per_minute"]
    return res


def lifecycle_table(res: dict[str, Any]) -> str:
    out = ["| mode | machines | wall | **machines/min** | create | start (boot) | exec `true` "
           "| delete | cycle median / p90 |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for mode, label in (("sequential", "1 client"), ("concurrent2", "2 clients at once")):
        r = res[mode]
        p = r["phases_median_s"]
        out.append(f"| {label} | {r['machines']} | {r['wall_s']:.1f} s | **{r['per_minute']:.1f}** "
                   f"| {ms(p['create'])} | {p['start']:.2f} s | {ms(p['exec'])} | "
                   f"{ms(p['delete'])} | {p['cycle']:.2f} / {r['cycle_p90_s']:.2f} s |")
    out.append(f"\nTwo clients / one client: **{res['speedup']:.2f}×** the throughput.")
    return "\n".join(out)


# --- 3. memory per idle machine -----------------------------------------------------


def smaps(pid: int) -> dict[str, int]:
    """Pss, Pss_Anon, Pss_File, Pss_Shmem, Rss of ``pid`` in KiB (smaps_rollup)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1])
    return out


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cgroup_charge(pid: int) -> int | None:
    """Bytes charged to the memory cgroup of ``pid`` (v1 usage_in_bytes or v2 memory.current)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, ctrl, path = line.split(":", 2)
            if ctrl == "memory":
                f = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.usage_in_bytes"
            elif ctrl == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
                f = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.current"
            else:
                continue
            if f.exists() and path not in ("/", ""):
                return int(f.read_text())
    return None


def page_cache_kib(path: Path) -> int | None:
    """Resident page cache of ``path`` (the guest-RAM file), via util-linux ``fincore``."""
    fincore = shutil.which("fincore")
    if fincore is None or not path.exists():
        return None
    out = subprocess.run([fincore, "-b", "-n", "-o", "RES", str(path)], capture_output=True,
                         text=True)
    return int(out.stdout.split()[0]) // 1024 if out.returncode == 0 and out.stdout else None


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    counts = sorted(args.counts)
    samples: dict[int, list[dict[str, float]]] = {n: [] for n in counts}
    with daemon() as d:
        load = LoadMeter(str(d.work))
        assert d.proc is not None
        with d.client() as c:
            for run in range(args.runs):
                made: list[dict[str, Any]] = []
                for n in counts:
                    while len(made) < n:
                        made.append(create_and_start(c, f"mem-{run}-{len(made)}", args.memory))
                    time.sleep(args.settle)
                    for _ in range(3):
                        per: list[dict[str, int]] = []
                        for m in made:
                            tot: dict[str, int] = {}
                            for p in descendants(int(m["pid"])):
                                for k, v in smaps(p).items():
                                    tot[k] = tot.get(k, 0) + v
                            # QEMU runs in the state dir; its guest RAM is ./memory there.
                            ram = Path(os.readlink(f"/proc/{m['pid']}/cwd")) / "memory"
                            tot["ram_file_cache"] = page_cache_kib(ram) or 0
                            tot["cgroup"] = (cgroup_charge(int(m["pid"])) or 0) // 1024
                            per.append(tot)
                        dm = smaps(d.proc.pid)
                        samples[n].append({
                            "pss": statistics.mean(x["Pss"] for x in per),
                            "pss_anon": statistics.mean(x.get("Pss_Anon", 0) for x in per),
                            "pss_file": statistics.mean(x.get("Pss_File", 0) for x in per),
                            "pss_shmem": statistics.mean(x.get("Pss_Shmem", 0) for x in per),
                            "rss": statistics.mean(x["Rss"] for x in per),
                            "ram_file_cache": statistics.mean(x["ram_file_cache"] for x in per),
                            "cgroup": statistics.mean(x["cgroup"] for x in per),
                            "total_pss": sum(x["Pss"] for x in per),
                            "daemon_pss": dm["Pss"], "daemon_rss": dm["Rss"]})
                        time.sleep(1.0)
                    used = []
                    for m in made:  # the guest's own view, read after the samples
                        out = check(c.post(f"/v1/machines/{m['id']}/exec",
                                           json={"cmd": ["cat", "/proc/meminfo"]}))["stdout"]
                        mi = {ln.split(":")[0]: int(ln.split()[1]) for ln in out.splitlines()}
                        used.append(mi["MemTotal"] - mi["MemFree"])
                    for x in samples[n][-3:]:
                        x["guest_used"] = statistics.mean(used)
                    print(f"run {run + 1}/{args.runs}, {n} machines: PSS/machine "
                          f"{samples[n][-1]['pss'] / 1024:.1f} MiB, daemon "
                          f"{samples[n][-1]['daemon_pss'] / 1024:.1f} MiB", file=sys.stderr)
                for m in made:
                    c.delete(f"/v1/machines/{m['id']}", params={"force": "true"})
        noise = load.finish()
    res: dict[str, Any] = {"guest_memory_mib": args.memory, "runs": args.runs,
                           "settle_s": args.settle, "noise": noise, "by_count": {}}
    for n, v in samples.items():
        res["by_count"][str(n)] = {k: statistics.median(x[k] for x in v) / 1024 for k in v[0]}
    return res


def memory_table(res: dict[str, Any]) -> str:
    out = ["| idle machines | PSS / machine | of it anon / file / shmem | RSS / machine | "
           "guest-RAM file in page cache / machine | memory cgroup charge / machine | "
           "guest's own MemTotal − MemFree | PSS, all machines | daemon PSS (RSS) |",
           "|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for n, r in res["by_count"].items():
        cg = f"{r['cgroup']:.0f} MiB" if r["cgroup"] else "n/a"
        out.append(f"| {n} | **{r['pss']:.1f} MiB** | {r['pss_anon']:.1f} / {r['pss_file']:.1f} "
                   f"/ {r['pss_shmem']:.1f} | {r['rss']:.1f} MiB | {r['ram_file_cache']:.1f} MiB "
                   f"| {cg} | {r['guest_used']:.1f} MiB | {r['total_pss']:.0f} MiB | "
                   f"{r['daemon_pss']:.1f} ({r['daemon_rss']:.1f}) MiB |")
    out.append(f"\nGuest memory size: {res['guest_memory_mib']} MiB per machine.")
    return "\n".join(out)


# --- docs -------------------------------------------------------------------------------

INTRO = f"""{SECTION} (`bench/daemon.py`)

What it measures, all through a private `ember serve` (its own data dir, the
three-layer busybox sample image imported as `bench:latest`), machines of
1 vCPU and 256 MiB with the daemon's cgroup limits, main process `sleep 3600`:

1. `exec`: the round trip of `exec -- true` on a running machine through the
   REST API (`POST /v1/machines/NAME/exec`, one kept-alive httpx client over
   the Unix socket, timed from the request to the parsed `ExecResult`); the
   same through the agent protocol alone (`Machine.exec` + `wait_process` in
   the benchmark's process, on a second machine of the same shape: no HTTP,
   no daemon); and what the guest itself takes for the same work: a busybox
   `sh` loop in the guest that reads `$EPOCHREALTIME` (gettimeofday, µs),
   runs `/bin/true` (ash does `fork` + `execve` + `wait4`, as the agent does:
   checked with strace on the host's copy of the same busybox binary) and reads
   the clock again, each iteration timed on its own. `/bin/true` is busybox,
   static. Also timed: an empty API request and a bare agent-channel round
   trip, to split the costs. The rounds alternate all the measurements and reverse their
   order every other round. Rerun: `.venv/bin/python bench/daemon.py exec`.
2. `lifecycle`: machines per minute for create → start (waits for the agent's
   READY) → exec `true` → delete (`force=true`: kill), one client at a time
   and two clients at once, alternating blocks of the two modes. Rerun:
   `.venv/bin/python bench/daemon.py lifecycle`.
3. `memory`: for 1, 4 and 8 idle machines (after a few seconds' settling),
   each QEMU's `Pss`/`Rss` from `/proc/PID/smaps_rollup` (summed over its
   process tree), the page cache held by its guest-RAM file (`fincore`;
   not in QEMU's PSS once the guest wrote the page: the file is mapped
   `share=off`), the charge of its memory cgroup, and the daemon's own PSS.
   Rerun: `.venv/bin/python bench/daemon.py memory`.

The machine is shared: other engineers boot VMs on it at the same time; each
block below records the load seen during its run.
"""


def machine_line(h: dict[str, Any]) -> str:
    return (f"Machine: {h['nproc']} CPUs ({h['cpu']}), {h['memory_gib']} GiB, host kernel "
            f"{h['kernel']}, QEMU {h['qemu']}, Python {h['python']}; accelerator "
            f"**{h['accel'].upper()}** ({h['accel_reason']}).")


def noise_line(n: dict[str, Any]) -> str:
    return (f"Load during the run: 1-min load average {n['loadavg_1min']['min']:.2f}–"
            f"{n['loadavg_1min']['max']:.2f}, host CPU busy {n['cpu_busy_pct']}% "
            f"(steal {n['cpu_steal_pct']}%), other people's QEMUs running: "
            f"{n['foreign_qemus']['min']}–{n['foreign_qemus']['max']}.")


def update_docs(name: str, body: str) -> None:
    begin, end = f"<!-- bench/daemon.py:{name} -->", f"<!-- /bench/daemon.py:{name} -->"
    text = DOCS.read_text()
    if SECTION not in text:
        blocks = "\n".join(f"<!-- bench/daemon.py:{k} -->\n<!-- /bench/daemon.py:{k} -->\n"
                           for k in ("exec", "lifecycle", "memory"))
        text = text.rstrip("\n") + "\n\n" + INTRO + "\n" + blocks + \
            "\n### Reading\n\n(to be written from the numbers above)\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text,
                  flags=re.S)
    DOCS.write_text(text)


def report(name: str, title: str, cmd: str, res: dict[str, Any], table: str,
           docs: bool) -> None:
    h = res["host"]
    body = (f"### {title}: {datetime.date.today().isoformat()}\n\n{machine_line(h)}\n"
            f"{noise_line(res['noise'])}\nCommand: `{cmd}`\n\n{table}\n")
    print(body)
    if docs:
        update_docs(name, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("what", choices=("exec", "lifecycle", "memory", "all"))
    ap.add_argument("--rounds", type=int, default=20, help="exec: rounds (default 20)")
    ap.add_argument("--per-round", type=int, default=10,
                    help="exec: round trips of each kind per round (default 10)")
    ap.add_argument("--blocks", type=int, default=4,
                    help="lifecycle: blocks of each mode (default 4)")
    ap.add_argument("--per-block", type=int, default=5,
                    help="lifecycle: machines per client per block (default 5)")
    ap.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")],
                    default=[1, 4, 8], help="memory: machine counts (default 1,4,8)")
    ap.add_argument("--runs", type=int, default=2, help="memory: ramps (default 2)")
    ap.add_argument("--memory", type=int, default=256, help="memory: guest MiB (default 256)")
    ap.add_argument("--settle", type=float, default=5.0, help="memory: idle seconds before "
                    "measuring (default 5)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    args = ap.parse_args()

    host = host_info()
    results: dict[str, Any] = {}
    todo = ("exec", "lifecycle", "memory") if args.what == "all" else (args.what,)
    for what in todo:
        if what == "exec":
            r = bench_exec(args)
            r["host"] = host
            report("exec", "Exec round trip", "bench/daemon.py exec "
                   f"--rounds {args.rounds} --per-round {args.per_round}", r, exec_table(r),
                   not args.no_docs)
        elif what == "lifecycle":
            r = bench_lifecycle(args)
            r["host"] = host
            report("lifecycle", "Lifecycle throughput", "bench/daemon.py lifecycle "
                   f"--blocks {args.blocks} --per-block {args.per_block}", r, lifecycle_table(r),
                   not args.no_docs)
        else:
            r = bench_memory(args)
            r["host"] = host
            report("memory", "Host memory per idle machine", "bench/daemon.py memory --counts "
                   f"{','.join(map(str, args.counts))} --runs {args.runs}", r, memory_table(r),
                   not args.no_docs)
        results[what] = r
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
