"""Machine networking without a VM: -p parsing, validation, the QEMU argv, the guest cmdline."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ember.errors import EmberError, VMMError
from ember.guest.bundle import GuestBundle
from ember.host.probe import AccelChoice
from ember.machine import Machine, MachineConfig
from ember.vmm import PortMapping, PortUnavailable, parse_port
from ember.vmm.network import check_ports_free, free_port, port_error
from ember.vmm.qemu import build_command
from ember.vmm.spec import MachineSpec


def spec(**kw: object) -> MachineSpec:
    base: dict[str, object] = dict(
        name="m1", state_dir=Path("/state/m1"), kernel=Path("/k/vmlinux"),
        initramfs=Path("/k/initrd.cpio"), cmdline="console=ttyS0",
    )
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


def opt_values(cmd: list[str], flag: str) -> list[str]:
    return [cmd[i + 1] for i, v in enumerate(cmd) if v == flag]


@pytest.mark.parametrize(("text", "want"), [
    ("8080:80", PortMapping(8080, 80)),
    ("0.0.0.0:8443:443", PortMapping(8443, 443, "0.0.0.0")),
    ("127.0.0.2:2222:22/tcp", PortMapping(2222, 22, "127.0.0.2")),
    (":9000:90", PortMapping(9000, 90)),
    (" 65535:1 ", PortMapping(65535, 1)),
])
def test_parse_port_forms(text: str, want: PortMapping) -> None:
    assert parse_port(text) == want


def test_parse_port_with_guest_alone_picks_a_free_host_port_on_loopback() -> None:
    p = parse_port("80")
    assert p.guest_port == 80 and p.host_ip == "127.0.0.1" and p.protocol == "tcp"
    with socket.socket() as s:  # the port is free: we can bind it ourselves
        s.bind(("127.0.0.1", p.host_port))
    assert parse_port("127.0.0.1::80").host_port > 0


@pytest.mark.parametrize(("text", "match"), [
    ("", "empty port mapping"),
    ("http", "guest port 'http' is not a number"),
    ("80:x", "guest port 'x' is not a number"),
    ("-1:80", "host port '-1' is not a number"),
    ("70000:80", "host port 70000 is not between 1 and 65535"),
    ("8080:0", "guest port 0 is not between 1 and 65535"),
    ("8080:80/udp", "only tcp"),
    ("1:2:3:4", "use HOST:GUEST, IP:HOST:GUEST or GUEST"),
    ("localhost:8080:80", "IPv4 address"),
    ("::1:8080:80", "use HOST:GUEST"),
    ("８０:80", "not a number"),  # fullwidth digits are digits to str.isdigit
])
def test_parse_port_rejects_bad_input_in_one_line(text: str, match: str) -> None:
    with pytest.raises(EmberError, match=match) as err:
        parse_port(text)
    assert "\n" not in str(err.value)


def test_parse_port_with_an_address_not_on_this_host_fails_clearly() -> None:
    with pytest.raises(EmberError, match="cannot bind a port on 192.0.2.1"):
        parse_port("192.0.2.1::80")  # TEST-NET-1: never a local address; bind only


@pytest.mark.parametrize("kw", [{"host_port": 0}, {"guest_port": 65536}, {"host_port": True},
                                {"host_ip": "::1"}, {"protocol": "udp"}])
def test_port_mapping_validates_its_fields(kw: dict[str, object]) -> None:
    fields: dict[str, object] = {"host_port": 8080, "guest_port": 80, **kw}
    with pytest.raises(EmberError):
        PortMapping(**fields)  # type: ignore[arg-type]


def test_machine_config_defaults_to_the_user_network() -> None:
    c = MachineConfig()
    assert c.network == "user" and c.ports == ()
    assert MachineConfig(ports=[PortMapping(1, 2)]).ports == (PortMapping(1, 2),)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "match"), [
    ({"network": "bridge"}, "network must be user or none, not 'bridge'"),
    ({"network": "none", "ports": (PortMapping(8080, 80),)},
     "ports cannot be published with network none"),
    ({"ports": (PortMapping(8080, 80), PortMapping(8080, 81))},
     "host port 127.0.0.1:8080 is published twice"),
    ({"ports": (PortMapping(8080, 80, "0.0.0.0"), PortMapping(8080, 81))}, "published twice"),
    ({"ports": ("8080:80",)}, "must be a PortMapping"),
])
def test_machine_config_rejects_bad_networks(kw: dict[str, object], match: str) -> None:
    with pytest.raises(EmberError, match=match):
        MachineConfig(**kw)  # type: ignore[arg-type]


def test_same_host_port_on_two_addresses_is_fine() -> None:
    MachineConfig(ports=(PortMapping(8080, 80), PortMapping(8080, 80, "127.0.0.2")))


def test_user_network_is_slirp_with_a_virtio_net_nic_and_hostfwd_rules() -> None:
    cmd = build_command(spec(network="user", ports=(PortMapping(8080, 80),
                                                    PortMapping(2222, 22, "0.0.0.0"))))
    netdev = opt_values(cmd, "-netdev")
    assert netdev == ["user,id=net0,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,ipv6=off,"
                      "hostfwd=tcp:127.0.0.1:8080-10.0.2.15:80,"
                      "hostfwd=tcp:0.0.0.0:2222-10.0.2.15:22"]
    assert "virtio-net-device,netdev=net0" in opt_values(cmd, "-device")


def test_no_network_means_no_nic() -> None:
    cmd = build_command(spec(network="none"))
    assert "-netdev" not in cmd and "-net" not in cmd
    assert not any("virtio-net" in d for d in opt_values(cmd, "-device"))
    # -nodefaults: QEMU adds no NIC of its own either
    assert "-nodefaults" in cmd


def test_spec_rejects_ports_without_network() -> None:
    with pytest.raises(VMMError, match="network none"):
        spec(network="none", ports=(PortMapping(8080, 80),))


def test_spec_keeps_the_network_through_json() -> None:
    s = spec(network="user", ports=(PortMapping(8080, 80, "127.0.0.2"),))
    d = s.to_json()
    assert d["network"] == "user"
    assert d["ports"] == [{"host_port": 8080, "guest_port": 80, "host_ip": "127.0.0.2",
                           "protocol": "tcp"}]
    assert MachineSpec.from_json(d) == s


def test_spec_json_from_before_networking_has_no_nic() -> None:
    d = spec(network="user").to_json()
    del d["network"], d["ports"]
    old = MachineSpec.from_json(d)
    assert old.network == "none" and old.ports == ()


def test_spec_json_with_a_bad_port_is_an_invalid_spec() -> None:
    d = spec(network="user").to_json()
    d["ports"] = [{"host_port": 0, "guest_port": 80, "host_ip": "127.0.0.1"}]
    with pytest.raises(VMMError, match="invalid machine spec: host port must be between"):
        MachineSpec.from_json(d)


def _create(tmp_path: Path, config: MachineConfig) -> Machine:
    return Machine.create(machines_dir=tmp_path, guest=GuestBundle(Path("/k"), Path("/i")),
                          rootfs=Path("/r.erofs"), accel=AccelChoice("tcg", "test"),
                          config=config, name="n1")


def test_machine_create_tells_the_guest_its_addresses(tmp_path: Path) -> None:
    m = _create(tmp_path, MachineConfig(ports=(PortMapping(8080, 80),)))
    assert "ember.net=10.0.2.15/24,10.0.2.2,10.0.2.3" in m.spec.cmdline.split()
    assert m.spec.network == "user" and m.spec.ports == (PortMapping(8080, 80),)


def test_machine_create_without_network_passes_no_net_parameter(tmp_path: Path) -> None:
    m = _create(tmp_path, MachineConfig(network="none"))
    assert "ember.net" not in m.spec.cmdline and m.spec.network == "none"


QEMU_HOSTFWD_ERROR = (  # QEMU 7.2's words, verbatim, as MachineCrashed carries them
    "machine 7afb4e2526dc: QEMU exited unexpectedly (status 1): qemu-system-x86_64: -netdev "
    "user,id=net0,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3,ipv6=off,"
    "hostfwd=tcp:127.0.0.1:{port}-10.0.2.15:80: Could not set up host forwarding rule "
    "'tcp:127.0.0.1:{port}-10.0.2.15:80'")


def test_a_port_in_use_is_named_with_its_reason() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        mapping = PortMapping(port, 80)
        with pytest.raises(PortUnavailable, match=f"host port 127.0.0.1:{port} is already "
                           "in use") as err:
            check_ports_free((PortMapping(free_port(), 81), mapping))
        assert err.value.port == mapping
        found = port_error(QEMU_HOSTFWD_ERROR.format(port=port), (mapping,))
        assert found is not None and found.port == mapping
        assert str(found) == f"host port 127.0.0.1:{port} is already in use"
    # freed since: still recognised, with the generic reason
    found = port_error(QEMU_HOSTFWD_ERROR.format(port=port), (mapping,))
    assert found is not None and "was in use when the machine started" in str(found)


def test_port_error_ignores_other_failures() -> None:
    ports = (PortMapping(8080, 80),)
    assert port_error("QEMU exited unexpectedly (signal 9)", ports) is None
    assert port_error(QEMU_HOSTFWD_ERROR.format(port=9999), ports) is None
