"""The host's TSC frequency, for guests on QEMU's software CPU.

Under TCG the guest's ``rdtsc`` reads the host's TSC, so the host can tell the
guest kernel its rate (``tsc_early_khz=``) instead of letting it calibrate
against the emulated PIT. That calibration costs about 170 ms of every boot
here, and on a busy host it fails outright: the kernel then falls back to the
jiffies clock (4 ms resolution, no high-resolution timers). ``tsc=reliable``
keeps the clocksource watchdog, fed by those same emulated timers, from
demoting a TSC that is in fact the host's.

Measured once per host boot (a 200 ms probe, ``guest/tsc-khz.c``), cached by
``boot_id``. Only hosts whose TSC runs at a constant rate qualify; elsewhere
(or on any failure) this says 0 and the guest calibrates as before.
"""

from __future__ import annotations

import platform
from pathlib import Path

from ember.errors import EmberError
from ember.util import atomic_write, log, run

#: Plausible TSC rates, in kHz.
_MIN_KHZ, _MAX_KHZ = 100_000, 10_000_000


def _constant_tsc() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"tsc", "constant_tsc", "nonstop_tsc"} <= flags
    except OSError:
        pass
    return False


def host_tsc_khz(cache_dir: Path) -> int:
    """The host's TSC rate in kHz, or 0 when unknown or not constant."""
    if platform.machine() != "x86_64":
        return 0
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return 0
    cached = cache_dir / "host" / f"tsc-khz-{boot_id}"
    try:
        return int(cached.read_text())
    except (OSError, ValueError):
        pass
    khz = 0
    if _constant_tsc():
        from ember.guest.agent import build_tsc_probe

        try:
            khz = int(run([str(build_tsc_probe(cache_dir))], timeout=10).strip())
        except (EmberError, OSError, ValueError) as exc:
            log.debug("measuring the TSC failed: %s", exc)
            return 0
        if not _MIN_KHZ <= khz <= _MAX_KHZ:
            log.debug("implausible TSC rate %d kHz: not used", khz)
            khz = 0
    for old in cached.parent.glob("tsc-khz-*") if cached.parent.is_dir() else ():
        old.unlink(missing_ok=True)  # earlier boots'
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cached, f"{khz}\n".encode())
    return khz
