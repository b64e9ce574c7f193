"""The jail's pieces that need no VM: levels, slots, command lines, /proc readings, rules."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ember.host import jail
from ember.vmm import netns
from ember.vmm.egress import EgressPolicy
from ember.vmm.network import PortMapping, backend_choice


@pytest.fixture(autouse=True)
def _fresh_policy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMBER_SLOTS_DIR", str(tmp_path / "slots"))
    jail.policy.cache_clear()
    yield
    jail.policy.cache_clear()


def test_ember_jail_off_and_seccomp_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBER_JAIL", "off")
    assert jail.policy().mode == "off"
    jail.policy.cache_clear()
    monkeypatch.setenv("EMBER_JAIL", "seccomp")
    p = jail.policy()
    assert p.mode == "seccomp" and "uid" in p.missing and "EMBER_JAIL" in p.reason


def test_without_bubblewrap_only_seccomp_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "bwrap" else real(name))
    p = jail.policy()
    assert p.mode == "seccomp" and "bubblewrap" in p.reason


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("bwrap") is None, reason="root, bwrap")
def test_root_gets_the_full_jail() -> None:
    assert jail.policy().mode == "full" and jail.policy().missing == ()


def in_use(n: int) -> bool:
    fd = jail.hold_free_slot(n)
    if fd is None:
        return True
    os.close(fd)
    return False


def test_slots_are_exclusive_until_their_holder_closes() -> None:
    a = jail.reserve_slot("same hint")
    b = jail.reserve_slot("same hint")
    assert a.number != b.number and b.number == (a.number + 1) % jail.SLOTS
    assert a.uid == jail.JAIL_UID_BASE + a.number
    assert in_use(a.number)
    a.close()
    assert not in_use(a.number)
    held = jail.hold_free_slot(a.number)
    assert held is not None
    os.close(held)
    b.close()


def test_a_child_that_inherits_a_slot_keeps_it_after_the_parent_lets_go() -> None:
    s = jail.reserve_slot("inherit")
    child = subprocess.Popen(["sleep", "30"], pass_fds=[s.fd])
    try:
        s.close()
        assert in_use(s.number)  # the child's copy holds the lock
    finally:
        child.kill()
        child.wait()
    assert not in_use(s.number)


def test_bwrap_args_bind_at_host_paths_with_traversable_parents(tmp_path: Path) -> None:
    kernel, state = tmp_path / "cache/k/vmlinux", tmp_path / "home/machines/m"
    args = jail.bwrap_args(jail.Mounts((kernel,), (state / "vmm",), chdir=state),
                           bwrap="bwrap", share_net=False, userns=False, info_fd=9,
                           die_with_parent=True)
    joined = " ".join(args)
    assert f"--ro-bind {kernel} {kernel}" in joined
    assert f"--bind {state / 'vmm'} {state / 'vmm'}" in joined
    assert f"--chdir {state}" in joined
    for d in (tmp_path, tmp_path / "cache", tmp_path / "cache/k", state):
        assert f"--perms 0755 --dir {d} " in joined + " "
    # every parent is made before anything is bound under it
    assert joined.index(f"--dir {state} ") < joined.index("--bind ")
    assert "--unshare-net" in args and "--die-with-parent" in args
    assert "--unshare-user" not in args and "/etc/resolv.conf" not in joined
    slirp = jail.bwrap_args(jail.Mounts(), bwrap="bwrap", share_net=True, userns=True,
                            info_fd=9, die_with_parent=False)
    assert "--unshare-net" not in slirp and "--die-with-parent" not in slirp
    assert "--unshare-user" in slirp and "/etc/resolv.conf" in slirp


def test_setpriv_drops_every_capability_and_sets_no_new_privs() -> None:
    args = jail.setpriv_args(2000000005, 2000000005, (), setpriv="setpriv")
    assert "--reuid=2000000005" in args and "--regid=2000000005" in args
    assert {"--clear-groups", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all",
            "--no-new-privs"} <= set(args)
    assert "--groups=1999999999,993" in jail.setpriv_args(1, 1, (1999999999, 993),
                                                           setpriv="setpriv")


def test_observe_reads_this_process() -> None:
    me = jail.observe(os.getpid())
    assert me is not None
    assert me["uid"] == os.getuid() and me["namespaces"] == [] and not me["own_root"]
    assert jail.observe(2**22 + 12345) is None


def test_the_tap_backend_needs_the_full_jail_and_can_be_declined() -> None:
    assert backend_choice("", True, "")[0] == "tap"
    assert backend_choice("slirp", True, "")[0] == "slirp"
    assert backend_choice("", False, "")[0] == "slirp"
    name, why = backend_choice("", True, "no /dev/net/tun")
    assert name == "slirp" and "no /dev/net/tun" in why


def test_slot_networks_do_not_overlap() -> None:
    a, b = netns.SlotNet(0), netns.SlotNet(netns.POOL.num_addresses // 4 - 1)
    assert (a.host_ip, a.ns_ip, a.block) == ("10.200.0.1", "10.200.0.2", "10.200.0.0/30")
    assert b.ns_ip == "10.203.255.254"
    assert len(b.host_if) <= 15 and b.netns == f"ember-{b.slot}"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="root, nft")
def test_the_generated_rulesets_are_valid_nftables() -> None:
    net = netns.SlotNet(7)
    ports = (PortMapping(8080, 80), PortMapping(9000, 90, "0.0.0.0"))
    allow = EgressPolicy.from_json({"allow": ["203.0.113.0/24:443", "10.1.2.3"],
                                    "deny": ["203.0.113.7", "198.51.100.0/24:53"]})
    deny = EgressPolicy.from_json({"deny": ["203.0.113.7"]})
    for rules in (netns.host_rules(net, ports), netns.netns_rules(net, ports, "192.0.2.53"),
                  netns.netns_rules(net, (), None), netns.host_rules(net, ()),
                  netns.netns_rules(net, ports, "192.0.2.53", allow),
                  netns.netns_rules(net, (), None, deny)):
        check = subprocess.run(["nft", "-c", "-f", "-"], input=rules, capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stderr
    rules = netns.netns_rules(net, ports, "192.0.2.53")
    for blocked in ("169.254.0.0/16", "10.0.0.0/8", "127.0.0.0/8", "192.168.0.0/16"):
        assert blocked in rules
    assert "dnat to 192.0.2.53" in rules
    # an allowlist never falls through to "accept": what it does not name is dropped
    allowing = netns.netns_rules(net, ports, "192.0.2.53", allow)
    assert "203.0.113.0/24 . 443" in allowing and "10.1.2.3/32" in allowing
    forward = allowing.split("chain forward")[1].split("chain input")[0]
    assert 'oifname "host0" accept' not in forward
    assert forward.index("@deny") < forward.index("@allow")
