"""Guest artifacts: the initramfs writer, the kernel-config check, accelerator choice."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from ember.errors import HostError
from ember.guest import kernel as kernel_mod
from ember.guest.initramfs import CpioEntry, ensure_initramfs, guest_entries, write_cpio
from ember.host import probe


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs cpio")
def test_cpio_archive_is_read_back_by_gnu_cpio(tmp_path: Path) -> None:
    archive = write_cpio(guest_entries(b"#!/bin/sh\necho hi\n"))
    listing = subprocess.run(["cpio", "-itv"], input=archive, capture_output=True, check=True)
    lines = listing.stdout.decode().splitlines()
    names = [ln.split()[-1] for ln in lines]
    assert names == ["dev", "dev/console", "proc", "sys", "ember", "ember/lower",
                     "ember/rw", "ember/root", "init"]
    console = next(ln for ln in lines if ln.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--no-absolute-filenames", "init"], input=archive,
                   cwd=out, check=True, capture_output=True)
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((out / "init").stat().st_mode) == 0o755


def test_cpio_is_reproducible_and_aligned() -> None:
    entries = [CpioEntry("a", stat.S_IFREG | 0o644, b"xyz")]
    assert write_cpio(entries) == write_cpio(entries)
    assert len(write_cpio(entries)) % 4 == 0


def test_initramfs_is_cached_by_content(tmp_path: Path) -> None:
    init = tmp_path / "init"
    init.write_bytes(b"one")
    first = ensure_initramfs(init, tmp_path / "cache")
    mtime = first.stat().st_mtime_ns
    assert ensure_initramfs(init, tmp_path / "cache") == first
    assert first.stat().st_mtime_ns == mtime
    init.write_bytes(b"two")
    assert ensure_initramfs(init, tmp_path / "cache") != first


def test_kernel_check_reports_options_kconfig_dropped() -> None:
    fragment = "# c\nCONFIG_BLOCK=y\nCONFIG_VIRTIO_BLK=y\nCONFIG_MODULES=n\nCONFIG_NR_CPUS=16\n"
    final = "CONFIG_BLOCK=y\n# CONFIG_VIRTIO_BLK is not set\nCONFIG_NR_CPUS=16\n"
    assert kernel_mod.missing_options(fragment, final) == ["CONFIG_VIRTIO_BLK=y"]
    assert kernel_mod.missing_options(fragment, final + "CONFIG_MODULES=y\n") == [
        "CONFIG_VIRTIO_BLK=y", "CONFIG_MODULES=n"]


def test_project_fragment_asks_for_what_a_microvm_guest_needs() -> None:
    wanted = set(kernel_mod.requested_options(kernel_mod.FRAGMENT.read_text()))
    for opt in ("CONFIG_PVH=y", "CONFIG_BLOCK=y", "CONFIG_VIRTIO_BLK=y",
                "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y", "CONFIG_VIRTIO_CONSOLE=y",
                "CONFIG_EROFS_FS=y", "CONFIG_OVERLAY_FS=y", "CONFIG_DEVTMPFS=y",
                "CONFIG_SERIAL_8250_CONSOLE=y", "CONFIG_UNIX98_PTYS=y"):
        assert opt in wanted


def test_kernel_key_changes_with_the_fragment(tmp_path: Path) -> None:
    tarball = tmp_path / "src.tar.xz"
    tarball.write_bytes(b"x")
    frag = tmp_path / "f.config"
    frag.write_text("CONFIG_A=y\n")
    k1 = kernel_mod.kernel_key(tarball, frag)
    assert kernel_mod.kernel_key(tarball, frag) == k1
    frag.write_text("CONFIG_A=y\nCONFIG_B=y\n")
    assert kernel_mod.kernel_key(tarball, frag) != k1


def test_accel_auto_picks_tcg_on_pvm_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    real_exists = os.path.exists
    monkeypatch.setattr(os, "access", lambda p, m: True)
    pvm = ("/dev/kvm", "/sys/module/kvm_pvm")
    monkeypatch.setattr(os.path, "exists", lambda p: p in pvm or real_exists(p))
    choice = probe.choose_accel("auto")
    assert choice.name == "tcg" and "PVM" in choice.reason
    assert probe.choose_accel("tcg").name == "tcg"


def test_accel_auto_picks_kvm_where_it_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda p, m: True)
    monkeypatch.setattr(os.path, "exists", lambda p: p == "/dev/kvm")
    assert probe.choose_accel(None).name == "kvm"


def test_accel_kvm_without_dev_kvm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os.path, "exists", lambda p: False)
    monkeypatch.setattr(os, "access", lambda p, m: False)
    with pytest.raises(HostError, match="/dev/kvm"):
        probe.choose_accel("kvm")
    with pytest.raises(HostError, match="unknown accelerator"):
        probe.choose_accel("hvf")


def test_env_var_overrides_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_ACCEL", "tcg")
    assert probe.choose_accel(None).name == "tcg"


def test_guest_cmdline_states_the_apic_timer_period_from_the_kernel_hz() -> None:
    from ember.guest.bundle import GuestBundle
    from ember.machine import guest_cmdline

    line = guest_cmdline(GuestBundle(Path("k"), Path("i"), kernel_hz=250), "ember.root=/dev/vda")
    assert "lapic_timer_period=4000000" in line.split()
    assert line.endswith("ember.root=/dev/vda") and "reboot=t" in line
    # a kernel whose HZ is unknown gets no hint (it calibrates instead)
    assert "lapic_timer_period" not in guest_cmdline(GuestBundle(Path("k"), Path("i")))


def test_kernel_hz_is_read_from_the_built_config(tmp_path: Path) -> None:
    art = kernel_mod.KernelArtifact("k", tmp_path)
    (tmp_path / "config").write_text("CONFIG_A=y\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n")
    assert art.hz() == 250


def test_prune_keeps_the_current_builds_and_drops_stale_ones(tmp_path: Path) -> None:
    from ember.guest.agent import agent_path, poweroff_path
    from ember.guest.bundle import prune_guest_cache
    from ember.guest.initramfs import initramfs_path

    cache = tmp_path / "cache"
    kernel = kernel_mod.kernel_artifact(cache).dir
    agent, poweroff = agent_path(cache), poweroff_path(cache)
    for binary in (agent, poweroff):
        binary.parent.mkdir(parents=True)
        binary.write_bytes(binary.name.encode())
    current = [kernel, agent.parent, poweroff.parent,
               initramfs_path(agent, cache, "agent"), initramfs_path(poweroff, cache, "poweroff")]
    stale = [cache / "kernel" / "0ld", cache / "agent" / "0ld",
             cache / "initramfs" / "agent-0ld.cpio"]
    building = cache / "kernel" / ".build-x"
    for p in current + stale + [building]:
        if p.suffix == ".cpio":
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
        else:
            p.mkdir(parents=True, exist_ok=True)
    assert sorted(prune_guest_cache(cache)) == sorted(stale)
    assert all(p.exists() for p in current) and building.exists()
    assert not any(p.exists() for p in stale)


def test_guest_cmdline_states_the_host_tsc_rate_only_on_a_software_cpu() -> None:
    from ember.guest.bundle import GuestBundle
    from ember.machine import guest_cmdline

    bundle = GuestBundle(Path("k"), Path("i"), kernel_hz=250, tsc_khz=2_100_000)
    words = guest_cmdline(bundle, accel="tcg").split()
    assert "tsc_early_khz=2100000" in words and "tsc=reliable" in words
    assert "tsc_early_khz" not in guest_cmdline(bundle, accel="kvm")  # kvm-clock there
    assert "tsc" not in guest_cmdline(GuestBundle(Path("k"), Path("i")), accel="tcg")


def test_host_tsc_rate_is_measured_once_per_boot(tmp_path: Path) -> None:
    from ember.host.tsc import host_tsc_khz

    khz = host_tsc_khz(tmp_path)
    if khz == 0:
        pytest.skip("this host's TSC is not constant (or not x86-64)")
    assert 100_000 <= khz <= 10_000_000
    (cached,) = (tmp_path / "host").glob("tsc-khz-*")
    assert int(cached.read_text()) == khz
    cached.write_text("1234567\n")  # a second call reads the cache, measures nothing
    assert host_tsc_khz(tmp_path) == 1234567
