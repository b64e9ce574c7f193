"""The QEMU command line built from a MachineSpec: the flags a microVM depends on."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.errors import VMMError
from ember.vmm.qemu import TCG_TB_SIZE_MIB, build_command
from ember.vmm.spec import DriveSpec, MachineSpec


def spec(**kw: object) -> MachineSpec:
    base: dict[str, object] = dict(
        name="m1", state_dir=Path("/state/m1"), kernel=Path("/k/vmlinux"),
        initramfs=Path("/k/initrd.cpio"), cmdline="console=ttyS0 reboot=t",
    )
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


def opt_values(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, v in enumerate(cmd) if v == flag]


def test_microvm_machine_without_firmware_and_with_file_backed_memory() -> None:
    cmd = build_command(spec(memory_mib=512))
    machine = opt_values(cmd, "-M")[0]
    assert machine.startswith("microvm,")
    assert "x-option-roms=off" in machine and "memory-backend=mem" in machine
    backend = [o for o in opt_values(cmd, "-object") if o.startswith("memory-backend-file")]
    assert backend and "size=512M" in backend[0] and "mem-path=memory" in backend[0]
    assert opt_values(cmd, "-m") == ["512M"]
    assert "-no-reboot" in cmd and "-nodefaults" in cmd


def test_kernel_initrd_and_cmdline_are_passed_verbatim() -> None:
    cmd = build_command(spec(cmdline="console=ttyS0 ember.root=/dev/vda quiet"))
    assert opt_values(cmd, "-kernel") == ["/k/vmlinux"]
    assert opt_values(cmd, "-initrd") == ["/k/initrd.cpio"]
    assert opt_values(cmd, "-append") == ["console=ttyS0 ember.root=/dev/vda quiet"]


def test_accelerator_flags() -> None:
    tb = f"tb-size={TCG_TB_SIZE_MIB}"
    assert opt_values(build_command(spec(accel="tcg")), "-accel") == [f"tcg,{tb}"]
    assert opt_values(build_command(spec(accel="tcg", cpus=2)), "-accel") == [
        f"tcg,thread=multi,{tb}"]
    kvm = build_command(spec(accel="kvm"))
    assert opt_values(kvm, "-accel") == ["kvm"] and opt_values(kvm, "-cpu") == ["host"]


def test_agent_channel_is_a_named_virtserialport_on_a_server_socket() -> None:
    cmd = build_command(spec())
    chardevs = opt_values(cmd, "-chardev")
    # in vmm/, the one directory a jailed QEMU may write
    assert "socket,id=agent,path=vmm/agent.sock,server=on,wait=off" in chardevs
    assert "virtserialport,chardev=agent,name=ember.agent" in opt_values(cmd, "-device")
    assert any(c.startswith("socket,id=qmp,path=vmm/qmp.sock") for c in chardevs)
    assert "chardev=qmp,mode=control" in opt_values(cmd, "-mon")


def test_drives_become_virtio_blk_in_order_and_commas_are_escaped() -> None:
    cmd = build_command(spec(drives=(DriveSpec(Path("/img/a,b.erofs")),
                                     DriveSpec(Path("/s/rw.img"), readonly=False))))
    drives = opt_values(cmd, "-drive")
    assert drives[0].startswith("id=disk0,file=/img/a,,b.erofs,format=raw")
    assert "readonly=on" in drives[0] and "readonly=off" in drives[1]
    assert opt_values(cmd, "-device")[-2:] == ["virtio-blk-device,drive=disk0",
                                              "virtio-blk-device,drive=disk1"]


@pytest.mark.parametrize("kw", [{"cpus": 0}, {"cpus": 65}, {"memory_mib": 16},
                                {"accel": "hvf"}])
def test_spec_rejects_out_of_range_values(kw: dict[str, object]) -> None:
    with pytest.raises(VMMError):
        spec(**kw)


def test_spec_round_trips_through_json(tmp_path: Path) -> None:
    s = spec(state_dir=tmp_path, cpus=2, drives=(DriveSpec(Path("/x.erofs")),))
    assert MachineSpec.from_json(s.to_json()) == s


def test_the_sandbox_denies_spawning_privileges_and_obsolete_calls_when_asked() -> None:
    assert "-sandbox" not in build_command(spec())
    cmd = build_command(spec(), sandbox=True)
    assert opt_values(cmd, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]


def test_a_tap_network_is_the_inherited_descriptor_and_needs_it() -> None:
    from ember.errors import VMMError

    tapped = spec(network="user", net_backend="tap")
    cmd = build_command(tapped, tap_fd=17)
    assert opt_values(cmd, "-netdev") == ["tap,id=net0,fd=17,vhost=off"]
    assert "virtio-net-device,netdev=net0" in opt_values(cmd, "-device")
    with pytest.raises(VMMError, match="tap descriptor"):
        build_command(tapped)
