"""``ember doctor``: what this host can do, what is built, and where things are."""

from __future__ import annotations

import os
from typing import Any

from ember import __version__, paths
from ember.errors import EmberError, HostError
from ember.guest.bundle import guest_status
from ember.host.cgroup import probe as probe_cgroups
from ember.host.jail import policy as jail_policy
from ember.host.probe import choose_accel, free_disk_bytes, kvm_status, qemu_path, qemu_version
from ember.host.setup import missing_packages


def doctor_report(accel: str | None = None) -> dict[str, Any]:
    """Everything ``ember doctor`` shows, as one JSON-able dict; ``ok`` says if ``run`` can work."""
    kvm_ok, kvm_why = kvm_status()
    try:
        choice = choose_accel(accel)
        accel_info: dict[str, Any] = {"name": choice.name, "reason": choice.reason}
    except HostError as exc:
        accel_info = {"name": None, "reason": str(exc)}
    guest = guest_status(paths.cache_dir())
    data = paths.data_dir()
    missing = missing_packages()
    cg = probe_cgroups()
    report: dict[str, Any] = {
        "ember": __version__,
        "qemu": {"path": qemu_path(), "version": qemu_version()},
        "accelerator": accel_info,
        "kvm": {"usable": kvm_ok, "reason": kvm_why},
        "kernel": guest["kernel"],
        "agent": guest["agent"],
        "initramfs": guest["initramfs"],
        "data_dir": str(data),
        "cache_dir": str(paths.cache_dir()),
        "free_disk_bytes": free_disk_bytes(str(data)),
        "missing_packages": missing,
        "resource_limits": {"cgroup_version": cg.version, "controllers": list(cg.controllers),
                            "reason": cg.reason},
        "user": {"uid": os.getuid(), "root": os.getuid() == 0},
        "confinement": jail_policy().to_json(),
        "boot_snapshots": _boot_snapshots(),
    }
    report["ok"] = bool(report["qemu"]["path"] and accel_info["name"] and not missing)
    return report


def _boot_snapshots() -> dict[str, Any]:
    """The warm-start cache: its entries, their size on disk and the cap."""
    from ember.snapshots.start import boot_cache_cap, boot_store

    store = boot_store()
    snaps = store.all()
    try:
        cap: int | str = boot_cache_cap()
    except EmberError as exc:  # a bad EMBER_BOOT_CACHE: say so, do not fail the report
        cap = str(exc)
    return {"path": str(store.root), "entries": len(snaps),
            "bytes": sum(s.manifest.size_on_disk for s in snaps), "cap_bytes": cap}


def format_report(r: dict[str, Any]) -> str:
    def built(item: dict[str, Any]) -> str:
        if item.get("built"):
            return f"built      {item['path']}"
        return f"not built  (run `ember setup`; will be {item['path']})"

    q = r["qemu"]
    lines = [
        f"ember        {r['ember']}",
        f"qemu         {q['version']} ({q['path']})" if q["path"] else
        "qemu         not installed (run `ember setup`)",
        f"accelerator  {r['accelerator']['name']}: {r['accelerator']['reason']}",
        f"kernel       {built(r['kernel'])}",
        f"agent        {built(r['agent'])}",
        f"initramfs    {built(r['initramfs'])}",
        f"data dir     {r['data_dir']}",
        f"cache dir    {r['cache_dir']}",
        f"free disk    {r['free_disk_bytes'] / 1e9:.1f} GB",
        f"limits       {'' if r['resource_limits']['controllers'] else 'unavailable: '}"
        f"{r['resource_limits']['reason']}",
        f"jail         {r['confinement']['mode']}: {r['confinement']['reason']}"
        + (f" (not: {', '.join(r['confinement']['missing'])})"
           if r['confinement']['missing'] else ""),
    ]
    b = r["boot_snapshots"]
    cap = b["cap_bytes"]
    lines.append(f"boot snapshots {b['entries']} ({b['bytes'] / (1 << 20):.0f} MiB of "
                 + (f"{cap / (1 << 20):.0f} MiB" if isinstance(cap, int) else str(cap))
                 + f"; warm starts of ember run) in {b['path']}"
                 + ("" if not isinstance(cap, int) or cap else " (off: EMBER_BOOT_CACHE=0)"))
    if r["missing_packages"]:
        lines.append(f"missing      {' '.join(r['missing_packages'])} (run `ember setup`)")
    lines.append("status       " + ("ready" if r["ok"] else "not ready"))
    return "\n".join(lines)
