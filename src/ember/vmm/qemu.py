"""The QEMU command line for a ``MachineSpec``: one typed builder, nothing else knows the flags.

Choices and why:

* ``-M microvm``: no PCI, no ACPI tables to parse, no firmware (``x-option-roms=off``);
  the kernel is loaded straight into memory and entered through PVH. The CMOS
  RTC stays on: without it the guest kernel waits a full second at boot for a
  clock that never answers ("Unable to read current time from RTC"). ``isa-serial=on`` keeps
  one 8250 UART for the kernel console (captured to ``console.log``).
  ``acpi=off`` matters: with ACPI on, QEMU describes the virtio-mmio devices in
  ACPI tables *instead of* appending ``virtio_mmio.device=`` to the kernel command
  line, and the guest kernel (built without ACPI) then sees no disk and no port.
* Memory is a ``memory-backend-file``, not anonymous memory. A booted machine's
  is a memfd the host creates and QEMU inherits (``mem-path=/proc/self/fd/N``,
  ``share=on``): no file on any filesystem to leak, and the host can read the
  guest's RAM for a snapshot (``vmm/snapshot.py``). A clone maps its
  snapshot's memory file with ``share=off``: copy-on-write, so many clones share
  the pages they have not written. ``x-ignore-shared`` (set over QMP) keeps
  shared RAM out of the migration stream, so a snapshot's device state is a few
  tens of KB.
* A clone starts with ``-incoming defer`` and loads its device state from an
  inherited descriptor (``migrate-incoming fd:N``, ``vmm/snapshot.py``).
* ``-no-reboot`` with the guest's ``reboot=t``: a guest reboot is a triple fault,
  which QEMU turns into its own exit. That is how a guest powers off.
* Devices sit on the virtio-mmio bus; ``auto-kernel-cmdline`` (on by default)
  appends their ``virtio_mmio.device=`` entries to the kernel command line.
* The agent channel is a ``virtserialport`` backed by a Unix socket that QEMU
  listens on (``server=on,wait=off``): the host may connect, disconnect and
  reconnect (a restarted daemon) without the guest noticing.
* Devices (microvm has 8 virtio-mmio transports; docs/architecture.md, "Devices"):
  the console's virtio-serial, the root disk (virtio-blk), the root layer on
  disk (virtio-blk, when the machine has one), the NIC, one
  virtio-scsi controller whose LUN N is volume N, and one virtio-9p export whose
  entry N is share N; the last two only when the machine has any. Five at most,
  whatever the number of volumes and shares.
* The ``"user"`` network is QEMU's slirp (rootless NAT, ``vmm/network.py``) behind
  a ``virtio-net-device``; ``ipv6=off`` because the guest is set up for IPv4 only
  (slirp's router advertisements would hand it a second, half-configured stack).
  Published ports are ``hostfwd`` rules: QEMU binds them when it starts, and a
  port already in use makes QEMU exit at once ("Could not set up host forwarding
  rule"). ``"none"`` adds no NIC at all.
"""

from __future__ import annotations

from ember.errors import VMMError
from ember.vmm.network import (
    BACKEND_TAP,
    DNS_IP,
    GATEWAY_IP,
    GUEST_IP,
    NETWORK_CIDR,
    NETWORK_USER,
)
from ember.vmm.spec import AGENT_PORT_NAME, MachineSpec

#: The frequency of QEMU's local APIC bus (TCG and KVM's in-kernel APIC alike):
#: the guest's APIC timer counts at this rate.
APIC_BUS_HZ = 1_000_000_000

#: TCG's translation cache, MiB. QEMU's default is 1 GiB, which a guest running
#: varied code fills over time -- four times a 256 MiB guest's RAM, all resident.
#: Bounded, a full cache is flushed and refilled instead (``process.memory_limit_mib``).
TCG_TB_SIZE_MIB = 128


def build_command(spec: MachineSpec, qemu: str = "qemu-system-x86_64", *,
                  console_reconnect: bool = False, memory_fd: int | None = None,
                  sandbox: bool = False, tap_fd: int | None = None) -> list[str]:
    """The argv that starts ``spec``; paths of state files are relative to its state dir.

    ``memory_fd``: the inherited descriptor of a booted machine's memory (a memfd);
    without one, a file in the state directory mapped privately. ``sandbox``:
    QEMU's seccomp filter on every thread (``host/jail.py``). ``tap_fd``: the
    inherited tap of a ``"tap"`` network (``vmm/netns.py``).
    """
    S = MachineSpec
    if spec.restore is not None and not spec.restore.copy:
        memory = f"mem-path={_opt(str(spec.restore.memory))},share=off"
    elif memory_fd is not None:
        memory = f"mem-path=/proc/self/fd/{memory_fd},share=on"
    else:
        memory = f"mem-path={S.MEMORY_FILE},share=off"
    cmd = [
        qemu,
        "-name", f"ember-{spec.name},debug-threads=on",
        "-M", "microvm,x-option-roms=off,isa-serial=on,acpi=off,memory-backend=mem",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-smp", str(spec.cpus),
        "-m", f"{spec.memory_mib}M",
        "-object", f"memory-backend-file,id=mem,size={spec.memory_mib}M,{memory}",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initramfs),
        "-append", spec.cmdline,
        # QEMU connects to Ember's console recorder (vmm/console.py), which caps
        # the log: a chatty guest must not be able to fill the host's disk.
        "-chardev", (f"socket,id=console,path={S.CONSOLE_SOCKET},server=off"
                     + (",reconnect=1" if console_reconnect else "")),
        "-serial", "chardev:console",
        "-chardev", f"socket,id=qmp,path={S.QMP_SOCKET},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=agent,path={S.AGENT_SOCKET},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
    ]
    if spec.accel == "kvm":
        cmd += ["-accel", "kvm", "-cpu", "host"]
    else:
        cmd += ["-accel", ("tcg,thread=multi" if spec.cpus > 1 else "tcg")
                + f",tb-size={TCG_TB_SIZE_MIB}"]
    for i, drive in enumerate(spec.drives):
        ro = "on" if drive.readonly else "off"
        cmd += [
            "-drive", (f"id=disk{i},file={_opt(str(drive.path))},format={drive.format},"
                       f"if=none,readonly={ro}"),
            "-device", f"virtio-blk-device,drive=disk{i}",
        ]
    if spec.layer is not None:  # the writable root layer: vdb, after the image
        cmd += ["-drive", (f"id=layer,file={_opt(str(spec.layer.path))},format=raw,if=none,"
                           "readonly=off,discard=unmap"),
                "-device", "virtio-blk-device,drive=layer"]
    cmd += mount_args(spec)
    if spec.restore is not None:
        cmd += ["-incoming", "defer"]
    if sandbox:
        from ember.host.jail import SANDBOX

        cmd += ["-sandbox", SANDBOX]
    return cmd + network_args(spec, tap_fd)


def mount_args(spec: MachineSpec) -> list[str]:
    """The volumes' SCSI controller and LUNs, and the shares' 9p export."""
    args: list[str] = []
    if spec.volumes:
        args += ["-device", "virtio-scsi-device,id=scsi0,num_queues=1"]
    for i, v in enumerate(spec.volumes):
        ro = "on" if v.readonly else "off"
        args += ["-drive", (f"id=vol{i},file={_opt(str(v.path))},format=raw,if=none,"
                            f"readonly={ro},discard=unmap"),
                 "-device", f"scsi-hd,drive=vol{i},bus=scsi0.0,channel=0,scsi-id=0,lun={i}"]
    if spec.shares:
        from ember.volumes.shares import MOUNT_TAG, SHARES_ROOT

        args += ["-fsdev", f"local,id=shares,path={SHARES_ROOT},security_model=none",
                 "-device", f"virtio-9p-device,fsdev=shares,mount_tag={MOUNT_TAG}"]
    return args


def network_args(spec: MachineSpec, tap_fd: int | None = None) -> list[str]:
    """The ``"user"`` network's netdev and virtio-net NIC; nothing for ``"none"``.

    On a tap (``tap_fd``), the namespace's firewall and NAT do everything. On
    slirp, every ``hostfwd`` names the guest address: the agent sets it
    statically (slirp's default target, its first DHCP lease, happens to be the
    same address).
    """
    if spec.network != NETWORK_USER:
        return []
    if spec.net_backend == BACKEND_TAP:
        if tap_fd is None:
            raise VMMError(f"machine {spec.name}: a tap network needs its tap descriptor")
        return ["-netdev", f"tap,id=net0,fd={tap_fd},vhost=off",
                "-device", "virtio-net-device,netdev=net0"]
    netdev = f"user,id=net0,net={NETWORK_CIDR},host={GATEWAY_IP},dns={DNS_IP},ipv6=off"
    for p in spec.ports:
        netdev += f",hostfwd={p.protocol}:{p.host_ip}:{p.host_port}-{GUEST_IP}:{p.guest_port}"
    return ["-netdev", netdev, "-device", "virtio-net-device,netdev=net0"]


def _opt(value: str) -> str:
    """Escape a value for QEMU's option syntax, where a comma is written as two."""
    return value.replace(",", ",,")
