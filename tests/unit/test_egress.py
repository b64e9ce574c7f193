"""Egress policies as users write them (``vmm/egress.py``): rules, ``--egress`` values,
the API's JSON form. Nothing is enforced here (that needs root and a VM)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from ember.errors import EmberError
from ember.vmm.egress import MAX_RULES, EgressPolicy, Rule, parse_flag, parse_rule


@pytest.mark.parametrize(("text", "rule"), [
    ("1.2.3.4", "1.2.3.4/32"),
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("10.1.2.3/8", "10.0.0.0/8"),  # host bits dropped: the network it names
    ("192.168.1.7/255.255.255.0", "192.168.1.0/24"),
    ("0.0.0.0/0", "0.0.0.0/0"),
    ("1.1.1.1:53", "1.1.1.1/32:53"),
    ("10.0.0.0/8:443", "10.0.0.0/8:443"),
    ("  8.8.8.8:65535 ", "8.8.8.8/32:65535"),
    ("9.9.9.9:1", "9.9.9.9/32:1"),
])
def test_good_rules_are_normalised(text: str, rule: str) -> None:
    assert str(parse_rule(text)) == rule
    assert str(parse_rule(rule)) == rule  # the normal form reads back as itself


def test_a_rule_keeps_its_port_apart() -> None:
    r = parse_rule("10.1.2.3/16:8080")
    assert (r.network, r.port) == ("10.1.0.0/16", 8080)
    assert parse_rule("10.1.2.3").port is None


@pytest.mark.parametrize(("text", "message"), [
    ("1.2.3.4:0", "the port must be between 1 and 65535"),
    ("1.2.3.4:65536", "the port must be between 1 and 65535"),
    ("1.2.3.4:http", "the port must be between 1 and 65535"),
    ("1.2.3.4:", "the port must be between 1 and 65535"),
    ("1.2.3.4:\u0663", "the port must be between 1 and 65535"),  # a non-ASCII digit
    ("::1", "IPv6 is not supported"),
    ("2001:db8::/32", "IPv6 is not supported"),
    ("[2001:db8::1]:443", "IPv6 is not supported"),
    ("300.1.1.1", "expected CIDR"),
    ("1.2.3.4/33", "expected CIDR"),
    ("1.2.3", "expected CIDR"),
    ("10.0.0.0/8/8", "expected CIDR"),
    ("", "expected CIDR"),
    ("   ", "expected CIDR"),
    ("a b", "expected CIDR"),
])
def test_bad_rules_are_one_line_naming_the_rule(text: str, message: str) -> None:
    with pytest.raises(EmberError) as info:
        parse_rule(text)
    msg = str(info.value)
    assert message in msg and "\n" not in msg
    assert msg.startswith(f"egress rule {text!r}:")


@pytest.mark.parametrize("value", [None, 5, 1.5, ["1.1.1.1"], {"allow": "1.1.1.1"}, b"1.1.1.1"])
def test_rules_of_the_wrong_kind_are_refused(value: Any) -> None:
    with pytest.raises(EmberError, match="egress rule"):
        parse_rule(value)


def test_domain_rules_are_names_lowercased() -> None:
    """Domains are the resolver's (``vmm/resolver.py``): the rule keeps the name."""
    assert str(parse_rule("API.Example.com.:443")) == "api.example.com:443"
    r = parse_rule("*.example.com")
    assert (r.domain, r.network, r.port) == ("*.example.com", None, None)


@pytest.mark.parametrize("text", ["*example.com", "a.*.example.com", "*", "*.com.*",
                                  "-bad.example.com", "example", "exa_mple.com"])
def test_bad_domains_are_refused(text: str) -> None:
    with pytest.raises(EmberError, match=re.escape(f"egress rule {text!r}:")):
        parse_rule(text)


# ------------------------------------------------------------- --egress


def test_flag_values_add_up_allow_and_deny() -> None:
    policy = parse_flag(["allow=1.1.1.1:53, 10.0.0.0/8", "deny=10.1.0.0/16",
                         "allow=9.9.9.9,,", " deny =10.2.0.0/16"])
    assert policy is not None and policy.allowlist
    assert policy.to_json() == {"allow": ["1.1.1.1/32:53", "10.0.0.0/8", "9.9.9.9/32"],
                                "deny": ["10.1.0.0/16", "10.2.0.0/16"]}


def test_flag_values_without_rules_are_no_policy() -> None:
    assert parse_flag([]) is None
    assert parse_flag(["allow=", "deny=,"]) is None
    deny_only = parse_flag(["deny=10.0.0.0/8"])
    assert deny_only is not None and not deny_only.allowlist


@pytest.mark.parametrize("value", ["1.1.1.1", "permit=1.1.1.1", "allow", "=1.1.1.1",
                                   "allowed=1.1.1.1"])
def test_flag_values_need_allow_or_deny(value: str) -> None:
    with pytest.raises(EmberError, match="use allow=RULE,... or deny=RULE,..."):
        parse_flag([value])


def test_a_bad_rule_in_a_flag_is_named() -> None:
    with pytest.raises(EmberError, match=r"egress rule '::1': IPv6"):
        parse_flag(["allow=1.1.1.1", "deny=::1"])


# ------------------------------------------------------------- JSON


def test_json_round_trip_and_no_policy() -> None:
    p = EgressPolicy.from_json({"allow": ["10.1.2.3/8:80"], "deny": ["1.2.3.4"]})
    assert p == EgressPolicy(allow=(Rule("10.0.0.0/8", 80),), deny=(Rule("1.2.3.4/32"),))
    assert p.to_json() == {"allow": ["10.0.0.0/8:80"], "deny": ["1.2.3.4/32"]}
    assert EgressPolicy.from_json(p.to_json()) == p
    for none in (None, {}, {"allow": []}, {"allow": [], "deny": []}, {"allow": None}):
        assert EgressPolicy.from_json(none) is None


@pytest.mark.parametrize("d", [{"allow": "1.1.1.1"}, {"deny": {"a": 1}}, {"allow": 5}])
def test_json_lists_of_rules_only(d: dict[str, Any]) -> None:
    with pytest.raises(EmberError, match="allow and deny must be lists of rules"):
        EgressPolicy.from_json(d)


def test_json_rules_of_the_wrong_kind_are_named() -> None:
    with pytest.raises(EmberError, match="egress rule 53"):
        EgressPolicy.from_json({"allow": ["1.1.1.1", 53]})


def test_at_most_max_rules_in_all() -> None:
    half = MAX_RULES // 2
    ok = EgressPolicy.from_json({"allow": ["1.1.1.1"] * half, "deny": ["2.2.2.2"] * half})
    assert ok is not None and len(ok.allow) + len(ok.deny) == MAX_RULES
    with pytest.raises(EmberError, match=f"at most {MAX_RULES} rules"):
        EgressPolicy.from_json({"allow": ["1.1.1.1"] * half, "deny": ["2.2.2.2"] * (half + 1)})


def test_resolver_names_match_exactly_or_below_a_wildcard() -> None:
    from ember.vmm.egress import parse_rule
    from ember.vmm.resolver import matches

    exact, wild = parse_rule("api.example.com:443"), parse_rule("*.example.com")
    assert matches(exact, "api.example.com") and not matches(exact, "x.api.example.com")
    assert matches(wild, "a.b.example.com") and not matches(wild, "example.com")
    assert not matches(wild, "badexample.com") and not matches(parse_rule("10.0.0.0/8"), "x")


def test_the_resolver_refuses_unlisted_names_without_asking_upstream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    import dns.message
    import dns.rcode

    from ember.vmm import resolver
    from ember.vmm.egress import EgressPolicy

    monkeypatch.setattr(resolver, "upstream", lambda: pytest.fail("asked upstream"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        served = resolver.Served(0, EgressPolicy.from_json({"allow": ["a.test"]}) or
                                 pytest.fail("no policy"), s)
        reply = resolver.answer(served, dns.message.make_query("b.test", "A").to_wire())
        assert reply is not None
        assert dns.message.from_wire(reply).rcode() == dns.rcode.NXDOMAIN
        assert served.denied == 1
        # garbage is dropped, not answered
        assert resolver.answer(served, b"\x00\x01garbage") is None
